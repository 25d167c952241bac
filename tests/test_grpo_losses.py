"""GRPO's pieces on hand-computed numbers: group advantages (scales, RLOO, missing rewards, zero spread),
the clipped ratio with clip-higher, the KL estimators, each aggregation mode, and the μ = 1 gradient."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    aggregate,
    clip_fractions,
    clipped_policy_loss,
    group_advantages,
    grpo_token_loss,
    kl_penalty,
    zero_spread_fraction,
)

EPS = 1e-4


def test_group_advantages_known_numbers():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4
    adv = group_advantages(rewards, 4)
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    expected = [(r - 2.5) / (std + EPS) for r in (1, 2, 3, 4)] + [0.0] * 4  # a zero-spread group: no gradient
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert zero_spread_fraction(rewards, 4) == 0.5
    # Dr. GRPO: no std division
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="none")[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5])
    )
    # batch: one std for every group (here passed explicitly, as several processes do)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="batch", batch_std=2.0)[:4],
        torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (2 + EPS),
    )
    batch_std = float(rewards.std())
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="batch"),
        group_advantages(rewards, 4, scale="batch", batch_std=batch_std),
    )


def test_rloo_baseline_leaves_each_completion_out():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv = group_advantages(rewards, 4, scale="none", baseline="leave_one_out")
    expected = [1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3]
    torch.testing.assert_close(adv, torch.tensor(expected))
    # r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean)
    torch.testing.assert_close(adv, 4 / 3 * group_advantages(rewards, 4, scale="none"))


def test_leave_one_out_is_rloo_by_default():
    """baseline: leave_one_out leaves scale unset → none, so the configured advantages are RLOO's exactly
    (with scale: group they would be GRPO's × G/(G−1)); an explicit scale is kept."""
    from preftune.config import train_config_from_dict

    def grpo(**section):
        return train_config_from_dict({"method": "grpo", "data": {"train": "p.jsonl"}, "grpo": section}).grpo

    g = grpo(baseline="leave_one_out", completions_per_prompt=4)
    assert g.scale == "none"
    rewards = torch.tensor([0.3, 1.7, 0.2, 0.9, 5.0, -1.0, 2.5, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, g.completions_per_prompt, scale=g.scale, baseline=g.baseline)
    r = rewards.tolist()
    rloo = [r[i] - sum(r[j] for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i) / 3 for i in range(8)]
    torch.testing.assert_close(adv, torch.tensor(rloo, dtype=torch.float64), rtol=0, atol=1e-12)
    assert grpo(baseline="leave_one_out", scale="group").scale == "group"  # set: kept
    assert grpo().scale == "group" and grpo(baseline="mean", scale=None).scale == "group"


def test_missing_rewards_are_left_out_of_the_group():
    rewards = torch.tensor([1.0, 0.0, 3.0, 100.0, 7.0, 0.0])  # 0.0 placeholders where no reward
    valid = torch.tensor([True, False, True, True, True, False])
    adv = group_advantages(rewards, 3, scale="none", valid=valid)
    # group 1: rewards 1 and 3 (mean 2); group 2: 100 and 7 (mean 53.5)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 46.5, -46.5, 0.0]))
    one = group_advantages(torch.tensor([5.0, 0.0, 0.0]), 3, valid=torch.tensor([True, False, False]))
    assert one.tolist() == [0.0, 0.0, 0.0]  # a group with one reward has no baseline


def test_groups_of_one_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="P·G"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_clip_higher_on_known_ratios():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.5, 0.9, 1.25, 1.5]])
    logps = torch.log(ratios)
    # positive advantage: gains above 1 + ε_high are clipped; with ε_high = 0.28 (DAPO) 1.25 passes
    loss, ratio = clipped_policy_loss(logps, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(ratio, ratios)
    torch.testing.assert_close(loss, -torch.tensor([[0.5, 0.9, 1.25, 1.28]]))
    symmetric, _ = clipped_policy_loss(logps, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(symmetric, -torch.tensor([[0.5, 0.9, 1.2, 1.2]]))
    # negative advantage: min(ρÂ, clip(ρ)Â) keeps the larger penalty; below 1 − ε_low it is clipped
    neg, _ = clipped_policy_loss(logps, old, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(neg, torch.tensor([[0.8, 0.9, 1.25, 1.5]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert clip_fractions(ratio, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28) == {
        "clip_ratio/low": 0.0,
        "clip_ratio/high": 0.25,
        "clip_ratio/region": 0.25,
    }
    assert (
        clip_fractions(ratio, torch.tensor([-1.0]), mask, eps_low=0.2, eps_high=0.28)["clip_ratio/low"]
        == 0.25
    )


def test_kl_estimators():
    logps = torch.tensor([-1.0, -2.0, -0.5])
    assert all(float(kl_penalty(logps, logps, k).abs().max()) == 0.0 for k in ("k1", "k2", "k3"))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    x = ref - logps  # log π_ref − log π_θ = [-0.5, 1.0, 0]
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), -x)
    torch.testing.assert_close(kl_penalty(logps, ref, "k2"), x * x / 2)
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), torch.exp(x) - x - 1)
    assert (kl_penalty(torch.randn(1000), torch.randn(1000), "k3") >= 0).all()
    with pytest.raises(ValueError, match="KL estimator must be one of"):
        kl_penalty(logps, ref, "k4")
    # k3 is unbiased: E_{y~π_θ}[k3] = KL(π_θ‖π_ref), here for two categorical distributions
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    expected_k3 = float((p * kl_penalty(p.log(), q.log(), "k3")).sum())
    assert expected_k3 == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_term_expected_gradient_on_a_categorical(kind):
    """E_{y~π_θ}[∇_θ k(y)], summed exactly over the 5 outcomes with weights π_θ(y) detached (what the
    sampled loss's gradient estimates), is 0 for k1, ∇KL(π_θ‖π_ref) for k2 and ∇KL(π_ref‖π_θ) for k3."""
    theta = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.1, 1.0, -0.9], dtype=torch.float64), -1)

    def grad_of(f):
        return torch.autograd.grad(f(torch.log_softmax(theta, -1)), theta)[0]

    expected = grad_of(lambda logp: (logp.exp().detach() * kl_penalty(logp, ref, kind)).sum())
    reverse = grad_of(lambda logp: (logp.exp() * (logp - ref)).sum())  # ∇KL(π_θ‖π_ref), closed form
    forward = grad_of(lambda logp: (ref.exp() * (ref - logp)).sum())  # ∇KL(π_ref‖π_θ), closed form
    assert float((reverse - forward).abs().min()) > 0.01  # the two differ in every coordinate here
    closed = {"k1": torch.zeros(5, dtype=torch.float64), "k2": reverse, "k3": forward}[kind]
    torch.testing.assert_close(expected, closed, rtol=0, atol=1e-12)


def test_k3_is_clamped_as_verl_and_openrlhf_do():
    logps = torch.tensor([-1.0, -1000.0, -1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-61.0, -1.0, -1.0 + 2.0, -1.0 - 2.0])  # x = −60, 999, 2, −2
    k3 = kl_penalty(logps, ref, "k3")
    # x = −60: clamped to −20, e^−20 + 19 > 10 → 10; x = 999 (eˣ = inf in fp32): clamped to 20, e^20 − 21 → 10;
    # |x| = 2: untouched
    expected = torch.tensor([10.0, 10.0, math.exp(2) - 3, math.exp(-2) + 1])
    torch.testing.assert_close(k3, expected)
    (grad,) = torch.autograd.grad(k3.sum(), logps)
    assert grad[:2].tolist() == [0.0, 0.0]  # no gradient beyond the bounds (unclamped x: inf·0 = NaN)
    torch.testing.assert_close(grad[2:], torch.tensor([1 - math.exp(2), 1 - math.exp(-2)]))  # ∂k3/∂log π_θ


LOSSES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_aggregation_modes_on_a_masked_tensor():
    kw = dict(n_sequences=3, n_tokens=6, max_length=4)
    # paper: per-completion means 2, 4, 5.5, then their mean
    assert float(aggregate(LOSSES, MASK, "sequence_mean", **kw)) == pytest.approx((2 + 4 + 5.5) / 3)
    # DAPO: every token of the step alike, 21 / 6
    assert float(aggregate(LOSSES, MASK, "token_mean", **kw)) == pytest.approx(21 / 6)
    # Dr. GRPO: a constant, G'·L_max = 12
    assert float(aggregate(LOSSES, MASK, "constant", **kw)) == pytest.approx(21 / 12)
    # the step's counts, not the micro-batch's: two micro-batches add up to the whole
    for mode in ("sequence_mean", "token_mean", "constant"):
        parts = aggregate(LOSSES[:1], MASK[:1], mode, **kw) + aggregate(LOSSES[1:], MASK[1:], mode, **kw)
        assert float(parts) == pytest.approx(float(aggregate(LOSSES, MASK, mode, **kw)))
    # a completion without loss tokens adds nothing and divides by nothing
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert (
        float(aggregate(torch.ones(1, 4), empty, "sequence_mean", n_sequences=1, n_tokens=0, max_length=4))
        == 0.0
    )
    assert (
        float(aggregate(torch.ones(1, 4), empty, "token_mean", n_sequences=1, n_tokens=0, max_length=4))
        == 0.0
    )
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(LOSSES, MASK, "mean", **kw)


def test_at_one_update_per_batch_the_gradient_is_the_advantage_weighted_logprob_gradient():
    torch.manual_seed(0)
    theta = torch.randn(3, 5, 7, requires_grad=True)  # logits of 3 completions, 5 positions, 7 tokens
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5, -1.0])

    def logps():
        return torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (3, 5)

    lp = logps()
    loss_t, ratio, kl_t = grpo_token_loss(lp, lp.detach(), adv, eps_low=0.2, eps_high=0.2)
    assert torch.equal(ratio, torch.ones_like(ratio)) and kl_t is None
    loss = aggregate(loss_t, mask, "token_mean", n_sequences=3, n_tokens=10, max_length=5)
    assert float(loss) == pytest.approx(-float((adv.unsqueeze(1) * mask).sum()) / 10)
    (grad,) = torch.autograd.grad(loss, theta)
    target = -(adv.unsqueeze(1) * logps() * mask).sum() / 10  # −Σ Â·log π / N_tokens
    (expected,) = torch.autograd.grad(target, theta)
    torch.testing.assert_close(grad, expected)


def test_kl_term_enters_with_beta():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    loss, _, kl_t = grpo_token_loss(
        lp, lp, torch.tensor([0.0]), eps_low=0.2, eps_high=0.2, beta=0.1, ref_logps=ref
    )
    torch.testing.assert_close(loss, 0.1 * kl_penalty(lp, ref, "k3"))
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(lp, lp, torch.tensor([0.0]), eps_low=0.2, eps_high=0.2, beta=0.1)
