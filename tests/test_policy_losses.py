"""GRPO's policy losses (``grpo.policy_loss``): GSPO's sequence ratio and CISPO's clipped, detached weight on
hand-computed numbers; all three give the on-policy policy gradient at the first update of a batch; beyond the
clip, GSPO drops whole completions and CISPO keeps every token's gradient; the numbers equal TRL 1.16.0's
``GRPOTrainer._compute_loss`` on the same inputs (pinned here, and re-run live where TRL is installed); the
config resolves each loss's own clip range and aggregation."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.config import ConfigError, train_config_from_dict
from preftune.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    capped_weight_fractions,
    cispo_policy_loss,
    grpo_token_loss,
    gspo_policy_loss,
    sequence_clip_fractions,
)

F64 = torch.float64


def grad_wrt_logps(loss_of, logps):
    """(value, ∂value/∂logps) of ``loss_of(logps)`` at ``logps`` (a fresh leaf)."""
    leaf = logps.clone().requires_grad_()
    value = loss_of(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return float(value.detach()), grad


def test_gspo_known_values():
    """Three completions, ε = 0.2, log-ratios x = log π_θ − log π_old (9.0 marks padding, left out):

    - x = [0.3, −0.1, pad], Â = +1: s = e^((0.3 − 0.1)/2) = e^0.1 = 1.10517, inside [0.8, 1.2]: loss
      −1.10517 on each token, gradient −Â·s/|o| = −1.10517/2 per token before the mean over the 3
      completions. Token 1's own ratio e^0.3 = 1.35 is beyond the token clip: GSPO still moves it.
    - x = [0.6, 0.3, 0.0], Â = −1: s = e^0.3 = 1.34986; min(−1.34986, −1.2) = −1.34986 (a negative
      advantage is not clipped above): loss +1.34986, gradient +1.34986/3 per token.
    - x = [1.2, −0.1, 0.4], Â = +1: s = e^0.5 = 1.64872 > 1.2: loss −1.2 and no gradient at all, although
      token 2's own ratio e^−0.1 = 0.905 is inside the token clip.
    Step loss (sequence_mean): (−1.10517 + 1.34986 − 1.2)/3 = −0.31844.
    """
    x = torch.tensor([[0.3, -0.1, 9.0], [0.6, 0.3, 0.0], [1.2, -0.1, 0.4]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.5, -3.0], [-0.2, -0.9, -1.1]], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    s0, s1, s2 = math.exp(0.1), math.exp(0.3), math.exp(0.5)

    loss, ratio = gspo_policy_loss(logps, logps - x, adv, mask, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(ratio, torch.tensor([s0, s1, s2], dtype=F64))
    expected = torch.tensor([[-s0, -s0, -s0], [s1, s1, s1], [-1.2, -1.2, -1.2]], dtype=F64)
    torch.testing.assert_close(loss, expected)  # the sequence's value on every token (padding included)

    def step(leaf):
        per_token, _ = gspo_policy_loss(leaf, logps - x, adv, mask, eps_low=0.2, eps_high=0.2)
        return aggregate(per_token, mask, "sequence_mean", n_sequences=3, n_tokens=8, max_length=3)

    value, grad = grad_wrt_logps(step, logps)
    assert value == pytest.approx((-s0 + s1 - 1.2) / 3, abs=1e-12)
    expected_grad = torch.tensor(
        [[-s0 / 2, -s0 / 2, 0.0], [s1 / 3, s1 / 3, s1 / 3], [0.0, 0.0, 0.0]], dtype=F64
    )
    torch.testing.assert_close(grad, expected_grad / 3)

    shares = sequence_clip_fractions(ratio, adv, mask, eps_low=0.2, eps_high=0.2)
    assert shares == pytest.approx(
        {"seq_clip_ratio/low": 0.0, "seq_clip_ratio/high": 1 / 3, "seq_clip_ratio/region": 1 / 3}
    )
    # s < 1 − ε_low with Â < 0 is the low clip; a completion without loss tokens has s = 1 and is not counted
    low, s_low = gspo_policy_loss(
        logps[:1], logps[:1] + 0.5, torch.tensor([-1.0], dtype=F64), mask[:1], eps_low=0.2, eps_high=0.2
    )
    assert float(s_low) == pytest.approx(math.exp(-0.5)) and low[0, 0].item() == pytest.approx(0.8)
    below = torch.full((2,), math.exp(-0.5), dtype=F64)  # the same s with Â < 0 (clipped) and Â > 0 (not)
    assert sequence_clip_fractions(
        below, torch.tensor([-1.0, 1.0], dtype=F64), mask[:2], eps_low=0.2, eps_high=0.2
    ) == pytest.approx({"seq_clip_ratio/low": 0.5, "seq_clip_ratio/high": 0.0, "seq_clip_ratio/region": 0.5})
    none = torch.zeros(1, 3, dtype=torch.bool)
    _, s_empty = gspo_policy_loss(logps[:1], logps[:1] - 3.0, adv[:1], none, eps_low=0.2, eps_high=0.2)
    assert s_empty.tolist() == [1.0]
    assert (
        sequence_clip_fractions(s_empty, adv[:1], none, eps_low=0.2, eps_high=0.2)["seq_clip_ratio/region"]
        == 0
    )


def test_cispo_known_values():
    """Token ratios ρ = [0.5, 1, 1.5, 6], Â = +1, log π_θ = [−1, −2, −0.5, −3]:

    - defaults (ε_low 1: no lower bound; ε_high 4: cap 5): w = [0.5, 1, 1.5, 5]; loss −w·Â·log π =
      [0.5, 2, 0.75, 15]; ∂loss/∂log π = −w·Â = [−0.5, −1, −1.5, −5]: every token has a gradient.
    - ε 0.2 / 0.2: w = [0.8, 1, 1.2, 1.2]; loss [0.8, 2, 0.6, 3.6]; gradient −w.
    - ε_low 0.6 (lower bound 0.4 < 0.5), ε_high 0.2: w = [0.5, 1, 1.2, 1.2].
    - Â = −2 flips and doubles the gradient: +2w.
    """
    ratio = torch.tensor([[0.5, 1.0, 1.5, 6.0]], dtype=F64)
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=F64)
    old = logps - ratio.log()
    mask = torch.ones(1, 4, dtype=torch.bool)
    own = POLICY_LOSSES["cispo"]
    cases = [
        ((own.epsilon_low, own.epsilon_high), 1.0, [0.5, 1.0, 1.5, 5.0]),
        ((0.2, 0.2), 1.0, [0.8, 1.0, 1.2, 1.2]),
        ((0.2, 0.2), -2.0, [0.8, 1.0, 1.2, 1.2]),
        ((0.6, 0.2), 1.0, [0.5, 1.0, 1.2, 1.2]),  # lower bound 0.4 < 0.5
    ]
    for (lo, hi), a, w in cases:
        adv = torch.tensor([a], dtype=F64)
        loss, rho = cispo_policy_loss(logps, old, adv, mask, eps_low=lo, eps_high=hi)
        torch.testing.assert_close(rho, ratio)
        weight = torch.tensor([w], dtype=F64)
        torch.testing.assert_close(loss, -weight * a * logps)
        kw = dict(eps_low=lo, eps_high=hi)
        _, grad = grad_wrt_logps(
            lambda leaf, kw=kw, adv=adv: cispo_policy_loss(leaf, old, adv, **kw)[0].sum(), logps
        )
        torch.testing.assert_close(grad, -weight * a)
    assert (own.epsilon_low, own.epsilon_high) == (1.0, 4.0)
    assert capped_weight_fractions(ratio, None, mask, eps_low=1.0, eps_high=4.0) == {
        "is_weight_capped/high": 0.25,
        "is_weight_capped/low": 0.0,
    }
    assert capped_weight_fractions(ratio, None, mask, eps_low=0.2, eps_high=0.2) == {
        "is_weight_capped/high": 0.5,
        "is_weight_capped/low": 0.25,
    }
    assert (
        capped_weight_fractions(ratio, None, mask, eps_low=0.6, eps_high=0.2)["is_weight_capped/low"] == 0.0
    )


def test_each_policy_loss_names_its_shares():
    """The trainer sums and logs exactly the names in ``shares``; each loss's metric function returns them."""
    ratio, mask = torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool)
    for name, spec in POLICY_LOSSES.items():
        r = ratio[:, 0] if spec.per == "sequences" else ratio
        assert (
            tuple(spec.fractions(r, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.2)) == spec.shares
        ), name
        assert spec.per in ("tokens", "sequences") and spec.aggregation in AGGREGATIONS


def on_policy_formula(logps, adv, mask, mode):
    """−Σ Â·log π aggregated as ``mode`` says, written out: its gradient is the on-policy policy gradient."""
    m = mask.to(logps.dtype)
    weighted = adv.unsqueeze(1) * logps * m  # (N, L)
    n, width = logps.shape
    if mode == "token_mean":
        return -weighted.sum() / m.sum()
    if mode == "sequence_mean":
        return -(weighted.sum(1) / m.sum(1)).sum() / n
    return -weighted.sum() / (n * width)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_first_update_gives_the_on_policy_policy_gradient(aggregation):
    """At one update per batch (π_old = sg[π_θ]: ρ = s = 1), clip, gspo and cispo, each with its own clip
    range, give the gradient of −Σ Â·log π_θ under the same aggregation, through a softmax over logits; the
    three aggregations give three different gradients here, so the comparison sees the aggregation too."""
    torch.manual_seed(0)
    theta = torch.randn(
        3, 5, 7, dtype=F64, requires_grad=True
    )  # logits of 3 completions, 5 positions, 7 tokens
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5, -1.0], dtype=F64)

    def logps():
        return torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (3, 5)

    (expected,) = torch.autograd.grad(on_policy_formula(logps(), adv, mask, aggregation), theta)
    others = [m for m in AGGREGATIONS if m != aggregation]
    for other in others:  # the aggregation matters for this data
        (g,) = torch.autograd.grad(on_policy_formula(logps(), adv, mask, other), theta)
        assert float((g - expected).abs().max()) > 1e-3
    for name, spec in POLICY_LOSSES.items():
        lp = logps()
        per_token, ratio, _ = grpo_token_loss(
            lp,
            lp.detach(),
            adv,
            eps_low=spec.epsilon_low,
            eps_high=spec.epsilon_high,
            policy_loss=name,
            mask=mask,
        )
        assert torch.equal(ratio, torch.ones_like(ratio)), name
        loss = aggregate(per_token, mask, aggregation, n_sequences=3, n_tokens=10, max_length=5)
        (grad,) = torch.autograd.grad(loss, theta)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12, msg=name)


def test_beyond_the_clip_gspo_drops_whole_completions_and_cispo_keeps_every_token():
    """ε = 0.2, log-ratios x per token; gradients with respect to log π_θ of the summed per-token loss.

    Token level, x = log [1.5, 0.5, 1.1]: with Â = +1 the clip drops the token at 1.5 (its gain is capped),
    with Â = −1 the token at 0.5; CISPO moves all six, each by its capped weight w = [1.2, 0.5, 1.1] (no lower
    bound).
    Sequence level: completion 1 (x = [0.3, −0.1]: s = e^0.1 inside) keeps both tokens under GSPO although
    token 1's ratio e^0.3 is beyond the token clip; completion 2 (x = [0.9, −0.1]: s = e^0.4 > 1.2, Â > 0) has
    no gradient under GSPO although token 2's ratio e^−0.1 is inside.
    """

    def gradient(name, logps, x, adv, eps_low=0.2):
        """∂(Σ per-token loss)/∂log π_θ at ``logps`` with log π_old = logps − x."""

        def summed(leaf):
            mask = torch.ones_like(leaf, dtype=torch.bool)
            kw = dict(eps_low=eps_low, eps_high=0.2, policy_loss=name, mask=mask)
            return grpo_token_loss(leaf, logps - x, adv, **kw)[0].sum()

        return grad_wrt_logps(summed, logps)[1]

    x = torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]], dtype=F64))
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.2]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    clip = gradient("clip", logps, x, adv)
    torch.testing.assert_close(clip, torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]], dtype=F64))
    cispo = gradient("cispo", logps, x, adv, eps_low=1.0)
    torch.testing.assert_close(cispo, torch.tensor([[-1.2, -0.5, -1.1], [1.2, 0.5, 1.1]], dtype=F64))
    assert bool((cispo != 0).all())

    x = torch.tensor([[0.3, -0.1], [0.9, -0.1]], dtype=F64)
    logps, adv = logps[:, :2], torch.tensor([1.0, 1.0], dtype=F64)
    gspo = gradient("gspo", logps, x, adv)
    s = math.exp(0.1)
    torch.testing.assert_close(gspo, torch.tensor([[-s, -s], [0.0, 0.0]], dtype=F64))
    clip = gradient("clip", logps, x, adv)
    assert clip[0, 0] == 0 and clip[1, 1] != 0  # the token clip decides the other way round


# ---- TRL 1.16.0 on the same inputs -------------------------------------------------------------------------
# 4 completions of 5, 3, 4 and 2 tokens; values at padding must not matter (the log-ratio 9.0 there).
LOGPS = torch.tensor(
    [
        [-0.7, -1.9, -0.2, -2.6, -1.1],
        [-1.4, -0.3, -3.2, -0.5, -0.9],
        [-0.6, -2.2, -1.0, -0.4, -1.7],
        [-2.9, -0.8, -0.1, -1.3, -0.6],
    ],
    dtype=F64,
)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, 0.5, -0.7, -1.2], dtype=F64)
REF = LOGPS + torch.tensor(
    [
        [0.3, -0.2, 0.1, 0.5, -0.4],
        [-0.6, 0.2, 0.0, 0.3, 0.1],
        [0.1, 0.4, -0.3, -0.2, 0.2],
        [0.2, -0.5, 0.3, 0.0, 0.1],
    ],
    dtype=F64,
)
# log π_θ − log π_old. SMALL: per-completion means 2e-4 (inside GSPO's 3e-4 / 4e-4), 1e-3 with Â > 0 (clipped
# high), −1e-3 with Â < 0 (clipped low), 1e-3 with Â < 0 (not clipped)
SMALL = torch.tensor(
    [
        [0.0010, -0.0008, 0.0004, 0.0002, -0.0003],
        [0.0030, -0.0010, 0.0010, 9.0, 9.0],
        [-0.0020, 0.0005, -0.0030, 0.0005, 9.0],
        [0.0025, -0.0005, 9.0, 9.0, 9.0],
    ],
    dtype=F64,
)
# LARGE: token ratios e^x from 0.41 to 6.7, on both sides of 1 ± 0.2 and beyond 5
LARGE = torch.tensor(
    [
        [0.3, -0.9, 1.8, 0.05, 0.0],
        [-0.1, 0.15, 1.7, 9.0, 9.0],
        [-0.3, 0.5, -0.05, 1.9, 9.0],
        [0.25, -0.4, 9.0, 9.0, 9.0],
    ],
    dtype=F64,
)

# case: (ours: policy_loss, ε_low, ε_high, aggregation, β, log-ratios), (TRL: loss_type,
# importance_sampling_level, epsilon, epsilon_high), TRL's loss, TRL's gradient at the loss tokens, TRL's clip
# metrics (where ours count the same)
TRL_CASES = {
    # GSPO as TRL's docs reproduce the paper (loss_type grpo: per-completion token mean), with β·k3
    "gspo_paper": (
        ("gspo", 3e-4, 4e-4, "sequence_mean", 0.04, SMALL),
        ("grpo", "sequence", 3e-4, 4e-4),
        0.10235666226813783,
        [
            [-0.0507047179, -0.0496424618, -0.0502153421, -0.0513024428, -0.0493456403],
            [0.0015039612, -0.0007380092, 0.0, 0.0, 0.0],
            [-0.0002629273, -0.0012295617, 0.0006479544, 0.0004531731, 0.0],
            [0.1490430612, 0.1521174217, 0.0, 0.0, 0.0],
        ],
        {"clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25, "clip_ratio/region_mean": 0.5},
    ),
    "gspo_wide": (
        ("gspo", 0.2, 0.2, "sequence_mean", 0.0, LARGE),
        ("grpo", "sequence", 0.2, 0.2),
        0.12047848137740336,
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0730388589, 0.0730388589, 0.0730388589, 0.0730388589, 0.0],
            [0.1391615229, 0.1391615229, 0.0, 0.0, 0.0],
        ],
        {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.5, "clip_ratio/region_mean": 0.5},
    ),
    # CISPO: TRL's ε_max = epsilon_high is our 1 + ε_high; no lower bound (our ε_low 1); with β·k3
    "cispo_cap5": (
        ("cispo", 1.0, 4.0, "token_mean", 0.04, LARGE),
        ("cispo", "token", 0.2, 5.0),
        0.3828784832373288,
        [
            [-0.0974180828, -0.0285227778, -0.3574433455, -0.0769442819, -0.0704866287],
            [-0.0310265125, -0.0421266594, -0.1785714286, 0.0, 0.0],
            [0.0367404227, 0.0810308501, 0.0483019906, 0.2505179121, 0.0],
            [0.1094267421, 0.0585802021, 0.0, 0.0, 0.0],
        ],
        {},  # TRL's cispo_clip_ratio counts only Â > 0 (2 of 14 tokens); ours counts every capped token
    ),
    "cispo_cap1.2": (
        ("cispo", 1.0, 0.2, "token_mean", 0.0, LARGE),
        ("cispo", "token", 0.2, 1.2),
        0.030924074220584217,
        [
            [-0.0857142857, -0.02904069, -0.0857142857, -0.0750907926, -0.0714285714],
            [-0.0323156221, -0.0414940801, -0.0428571429, 0.0, 0.0],
            [0.037040911, 0.06, 0.0475614712, 0.06, 0.0],
            [0.1028571429, 0.0574560039, 0.0, 0.0, 0.0],
        ],
        {},
    ),
    # the token clip with DAPO's clip-higher and token mean (TRL's loss_type dapo)
    "clip_dapo": (
        ("clip", 0.2, 0.28, "token_mean", 0.0, LARGE),
        ("dapo", "token", 0.2, 0.28),
        0.2049818221259016,
        [
            [0.0, -0.02904069, 0.0, -0.0750907926, -0.0714285714],
            [-0.0323156221, -0.0414940801, 0.0, 0.0, 0.0],
            [0.0, 0.0824360635, 0.0475614712, 0.3342947221, 0.0],
            [0.1100593214, 0.0, 0.0, 0.0, 0.0],
        ],
        {"clip_ratio/low_mean": 1 / 7, "clip_ratio/high_mean": 3 / 14, "clip_ratio/region_mean": 5 / 14},
    ),
}
# TRL's names for our shares (where the two count the same thing)
TRL_SHARE_NAMES = {
    "clip_ratio/low_mean": ("clip_ratio/low", "seq_clip_ratio/low"),
    "clip_ratio/high_mean": ("clip_ratio/high", "seq_clip_ratio/high"),
    "clip_ratio/region_mean": ("clip_ratio/region", "seq_clip_ratio/region"),
}


def ours(case):
    """Our step loss, its gradient with respect to log π_θ, and our clip shares on a TRL case's inputs."""
    name, eps_low, eps_high, aggregation, beta, log_ratio = case
    out = {}

    def step(leaf):
        per_token, ratio, _ = grpo_token_loss(
            leaf, LOGPS - log_ratio, ADV, eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logps=REF,
            policy_loss=name, mask=MASK,
        )  # fmt: skip
        out["shares"] = POLICY_LOSSES[name].fractions(
            ratio.detach(), ADV, MASK, eps_low=eps_low, eps_high=eps_high
        )
        return aggregate(per_token, MASK, aggregation, n_sequences=4, n_tokens=int(MASK.sum()), max_length=5)

    value, grad = grad_wrt_logps(step, LOGPS)
    return value, grad, out["shares"]


def matching_shares(trl_metrics, shares):
    for trl_name, value in trl_metrics.items():
        (mine,) = [k for k in TRL_SHARE_NAMES[trl_name] if k in shares]
        assert shares[mine] == pytest.approx(value, abs=1e-7), trl_name


@pytest.mark.parametrize("name", TRL_CASES)
def test_matches_trl_numbers(name):
    """Our loss, gradient and clip shares against the numbers TRL 1.16.0's ``GRPOTrainer._compute_loss`` gave
    on these inputs (float64; the live test below recomputes and prints them where TRL is installed)."""
    case, _, trl_loss, trl_grad, trl_metrics = TRL_CASES[name]
    value, grad, shares = ours(case)
    assert value == pytest.approx(trl_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(trl_grad, dtype=F64), rtol=0, atol=1e-9)
    matching_shares(trl_metrics, shares)


class _OneProcess:
    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


def run_trl(trl_case, beta, log_ratio):
    """TRL's own ``GRPOTrainer._compute_loss`` on our inputs: a stand-in trainer whose model returns LOGPS."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    loss_type, level, epsilon, epsilon_high = trl_case
    n, width = LOGPS.shape
    leaf = LOGPS.clone().requires_grad_()
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros(n, width, dtype=F64), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=_OneProcess(), _entropy_bonus_enabled=False,
        _metrics=metrics, max_completion_length=width,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": MASK.long(),
        "advantages": ADV,
        "old_per_token_logps": LOGPS - log_ratio,
        "num_items_in_batch": MASK.sum().to(F64),
        "ref_per_token_logps": REF,
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return float(loss), grad, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("name", TRL_CASES)
def test_matches_trl_live(name):
    """The same comparison against TRL itself (skipped where TRL is not installed; ``pip install --no-deps
    trl==1.16.0`` works beside this torch): also checks that the pinned numbers above are TRL's."""
    trl = pytest.importorskip("trl")
    case, trl_case, pinned_loss, pinned_grad, trl_shares = TRL_CASES[name]
    value, grad, shares = run_trl(trl_case, case[4], case[5])
    print(name, trl.__version__, repr(value), [[round(v, 10) for v in row] for row in (grad * MASK).tolist()])
    mine, my_grad, my_shares = ours(case)
    assert mine == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(my_grad, grad, rtol=0, atol=1e-12)
    assert bool((grad[~MASK] == 0).all())
    matching_shares({k: v for k, v in shares.items() if k in trl_shares}, my_shares)
    if trl.__version__ == "1.16.0":
        assert value == pytest.approx(pinned_loss, rel=1e-12)
        torch.testing.assert_close(grad, torch.tensor(pinned_grad, dtype=F64), rtol=0, atol=1e-9)
        assert {k: v for k, v in shares.items() if k in trl_shares} == pytest.approx(trl_shares)


# ---- the config --------------------------------------------------------------------------------------------


def grpo_section(**section):
    return train_config_from_dict({"method": "grpo", "data": {"train": "p.jsonl"}, "grpo": section}).grpo


def test_config_takes_each_policy_loss_range_and_aggregation_unless_set():
    """Unset epsilon_low / epsilon_high / aggregation resolve to the policy loss's own (clip: today's 0.2 /
    0.2, token_mean); values set are kept; an unknown policy loss and a bad range are refused."""
    for name, spec in POLICY_LOSSES.items():
        g = grpo_section(policy_loss=name)
        assert (g.epsilon_low, g.epsilon_high, g.aggregation) == (
            spec.epsilon_low,
            spec.epsilon_high,
            spec.aggregation,
        )
    assert (grpo_section().policy_loss, grpo_section().epsilon_low, grpo_section().aggregation) == (
        "clip",
        0.2,
        "token_mean",
    )
    assert (grpo_section(policy_loss="gspo").epsilon_low, grpo_section(policy_loss="gspo").epsilon_high) == (
        3e-4,
        4e-4,
    )
    g = grpo_section(policy_loss="gspo", epsilon_high=0.01, aggregation="token_mean")
    assert (g.epsilon_low, g.epsilon_high, g.aggregation) == (3e-4, 0.01, "token_mean")
    assert grpo_section(policy_loss="cispo", epsilon_low=10).epsilon_low == 10.0  # verl's "no lower bound"
    with pytest.raises(ConfigError, match="grpo.policy_loss must be one of clip, gspo, cispo"):
        grpo_section(policy_loss="sapo")
    with pytest.raises(ConfigError, match="epsilon_low must be in"):
        grpo_section(epsilon_low=1.0)  # the token clip needs a lower bound above 0
    with pytest.raises(ConfigError, match="epsilon_low must be in"):
        grpo_section(policy_loss="cispo", epsilon_high=-0.5)
