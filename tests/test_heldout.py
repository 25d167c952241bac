"""The one held-out evaluator (preftune.heldout), shared by online training's eval rows and the experiment:
log-ratios at the sampling temperature against a slow per-sample forward, the clustered summary by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from preftune import heldout
from preftune.config import GenerationConfig
from preftune.training.reference import Reference

real_score = heldout.score_groups


def slow_logp(model, prompt: list[int], completion: list[int], temperature: float) -> float:
    """log softmax(z/T) summed over the completion, one plain unpadded forward in float64."""
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    logp = torch.log_softmax(z / temperature, dim=-1)
    return float(logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).sum())


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    torch.manual_seed(0)
    policy, base = (
        build_tiny_model(tiny_tokenizer, seed=1).eval(),
        build_tiny_model(tiny_tokenizer, seed=2).eval(),
    )
    return policy, base


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_ratios_equal_slow_forwards_at_the_temperature(models, tiny_tokenizer, temperature, monkeypatch):
    policy, base = models
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    gen = GenerationConfig(max_new_tokens=5, temperature=temperature, batch_size=4)
    pad = tiny_tokenizer.pad_token_id
    groups, sampled = heldout.sample_groups(policy, prompts, 3, gen, eos_id=None, pad_id=pad, seed=3)
    assert [len(g) for g in groups] == [3, 3, 3]
    got = heldout.log_ratios(
        policy,
        Reference(base, "initial"),
        prompts,
        groups,
        pad_token_id=pad,
        batch_size=4,
        temperature=temperature,
    )
    mine = [slow_logp(policy, p, c, temperature) for p, group in zip(prompts, groups) for c in group]
    expected = [
        m - slow_logp(base, p, c, temperature)
        for m, (p, c) in zip(mine, [(p, c) for p, g in zip(prompts, groups) for c in g])
    ]
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(abs(e) for e in expected) > 1e-2  # two different models: the check is not of zeros
    # the sampler's own log-probs are the policy's (fp32), and standing in for its pass give the same ratios
    assert [lp for group in sampled for lp in group] == pytest.approx(mine, abs=1e-4)
    calls = []
    monkeypatch.setattr(heldout, "score_groups", lambda *a, **kw: calls.append(1) or real_score(*a, **kw))
    from_sampler = heldout.log_ratios(
        policy, Reference(base, "initial"), prompts, groups, pad_token_id=pad, batch_size=4,
        temperature=temperature, sampled_logps=sampled,
    )  # fmt: skip
    assert from_sampler == pytest.approx(expected, abs=1e-4) and not calls  # fp32: no policy pass
    # under bf16 autocast the sampler's numbers do not stand in: the policy is re-scored (wrong values ignored)
    wrong = [[0.0] * len(group) for group in groups]
    rescored = heldout.log_ratios(
        policy, Reference(base, "initial"), prompts, groups, pad_token_id=pad, batch_size=4,
        temperature=temperature, sampled_logps=wrong, mixed_precision="bf16",
    )  # fmt: skip
    assert calls == [1] and rescored == pytest.approx(got, abs=1e-12)
    with pytest.raises(ValueError, match="nested"):
        heldout.log_ratios(
            policy, Reference(base, "initial"), prompts, groups, pad_token_id=pad, batch_size=4,
            temperature=temperature, sampled_logps=[[0.0] * 9],
        )  # fmt: skip
    # the policy against itself: every log-ratio 0 (the base model's evaluation)
    same = heldout.log_ratios(
        base,
        Reference(base, "initial"),
        prompts,
        groups,
        pad_token_id=pad,
        batch_size=2,
        temperature=temperature,
    )
    assert same == pytest.approx([0.0] * 9, abs=1e-6)


def test_sampler_logps_stand_in_only_in_fp32(models):
    policy = models[0]
    assert heldout.sampler_logps_exact(policy, "no")
    assert not heldout.sampler_logps_exact(policy, "bf16")  # autocast: decode and forward round differently
    assert not heldout.sampler_logps_exact(policy.to(torch.bfloat16), "no")
    policy.to(torch.float32)


def test_summary_is_clustered_by_prompt_and_skips_missing_rewards():
    groups = [[[1], [2]], [[3], [4]], [[5], [6]]]
    clusters = heldout.clusters_of(groups)
    assert clusters == [0, 0, 1, 1, 2, 2]
    rewards = [1.0, 3.0, 2.0, None, 6.0, 4.0]
    ratios = [0.5, 0.5, 1.0, 1.0, 0.0, 3.0]
    out = heldout.summary(rewards, clusters, ratios)
    # by hand: 5 rewards, mean 16/5 = 3.2; cluster sums of deviations: (-2.2 - 0.2), (-1.2), (2.8 + 0.8)
    sums = [-2.4, -1.2, 3.6]
    se = math.sqrt(3 / 2 * sum(s * s for s in sums) / 5**2)
    assert out["reward"] == pytest.approx(3.2) and out["reward_se"] == pytest.approx(se)
    # KL: mean 1.0; cluster sums (-0.5 - 0.5), (0 + 0), (-1 + 2)
    assert out["kl"] == pytest.approx(1.0)
    assert out["kl_se"] == pytest.approx(math.sqrt(3 / 2 * (1 + 0 + 1) / 6**2))
    assert heldout.summary(rewards, clusters, None)["kl"] == 0.0


def test_sample_groups_refuses_top_p(models):
    with pytest.raises(ValueError, match="top_p"):
        heldout.sample_groups(models[0], [[5]], 1, GenerationConfig(top_p=0.9), eos_id=None, pad_id=0, seed=0)
