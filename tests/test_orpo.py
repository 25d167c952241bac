"""ORPO (Hong et al. 2024, arXiv 2403.07691): hand values, a plain-Python reference, TRL's numbers and
formula, stability at mean log-probs near 0 and near -inf, the registry and config, and training end to end."""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import load_file
from test_training import (
    STANDARD_KEYS,
    data8,  # noqa: F401  (fixture)
    hand_logps,
    make_cfg,
    max_change,
    metrics,
    pair_records,
    quiet,
    weights,
)

import preftune.training.run as run_module
from preftune.config import ConfigError, ORPOConfig, train_config_from_dict
from preftune.data import prompt_ids, response_ids
from preftune.losses import PAIR_METHODS, orpo_loss, pair_metrics
from preftune.losses.pairwise import ORPO_MAX_MEAN_LOGP, log1mexp
from preftune.training import train

ORPO_METRICS = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}


def t(*values: float, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- slow reference: python floats and math


def slow_logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def slow_orpo(pc: float, pr: float, n_w: int, n_l: int, beta: float) -> tuple[float, float, float]:
    """(loss, log odds ratio z, NLL) from summed log-probs, in float64 with the textbook formula."""
    l_w, l_l = pc / max(n_w, 1), pr / max(n_l, 1)
    p_w, p_l = math.exp(l_w), math.exp(l_l)
    z = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    return -l_w - beta * slow_logsigmoid(z), z, -l_w


# ---------------------------------------------------------------- values


def test_orpo_hand_value():
    """Chosen: 3 tokens, mean log-prob log 0.5 (p = 0.5, odds 1); rejected: 4 tokens, mean log 0.25 (p = 0.25,
    odds 1/3). log odds ratio = log 1 - log(1/3) = ln 3; NLL = -log 0.5 = ln 2;
    loss = ln 2 + beta * -log sigma(ln 3) = ln 2 + beta * log(1 + 1/3) = ln 2 + beta * ln(4/3)
         = 0.693147 + 0.1 * 0.287682 = 0.721915 at beta = 0.1, and 0.693147 + 0.287682 = 0.980829 at beta = 1.
    Rewards beta * mean log-prob: 0.1 * log 0.5 = -0.0693147 and 0.1 * log 0.25 = -0.138629."""
    pc, pr = t(3 * math.log(0.5)), t(4 * math.log(0.25))
    n_w, n_l = torch.tensor([3]), torch.tensor([4])
    out = orpo_loss(pc, pr, n_w, n_l, beta=0.1)
    close(out.losses, [math.log(2) + 0.1 * math.log(4 / 3)])
    close(out.losses, [0.7219153])
    close(orpo_loss(pc, pr, n_w, n_l, beta=1.0).losses, [0.9808293])
    close(out.chosen_rewards, [0.1 * math.log(0.5)])
    close(out.rejected_rewards, [0.1 * math.log(0.25)])
    close(out.metrics["nll_loss"], [math.log(2)])
    close(out.metrics["log_odds_chosen"], [math.log(3)])  # TRL's name for the log odds ratio
    close(out.metrics["log_odds_ratio"], [-math.log(4 / 3)])  # TRL's name for log sigma(log odds ratio)
    m = pair_metrics(out, pc, pr)
    assert m["loss"] == pytest.approx(0.7219153, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.1 * math.log(2), abs=1e-6)
    assert m["rewards/accuracies"] == 1.0
    assert m["nll_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["log_odds_chosen"] == pytest.approx(math.log(3), abs=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(-math.log(4 / 3), abs=1e-6)


def test_orpo_swapping_the_pair():
    """Equal responses: z = 0, loss = NLL + beta ln 2. Swapping chosen and rejected negates z."""
    out = orpo_loss(t(-2.0), t(-2.0), torch.tensor([4]), torch.tensor([4]), beta=0.5)
    close(out.losses, [0.5 + 0.5 * math.log(2)])
    a = orpo_loss(t(-1.0, -6.0), t(-3.0, -2.0), torch.tensor([2, 3]), torch.tensor([5, 1]), beta=0.3)
    b = orpo_loss(t(-3.0, -2.0), t(-1.0, -6.0), torch.tensor([5, 1]), torch.tensor([2, 3]), beta=0.3)
    close(a.metrics["log_odds_chosen"], -b.metrics["log_odds_chosen"])
    close(a.chosen_rewards, b.rejected_rewards)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_orpo_matches_slow_implementation(dtype, tol):
    """Random pairs, mean log-probs from -1e-5 (where a naive log1p(-exp(l)) in float32 is off by 5e-3)
    down to -8, lengths 1-40 (and 0, clamped to 1)."""
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        n_w, n_l = rng.randint(0, 40), rng.randint(1, 40)
        l_w, l_l = (-(10 ** rng.uniform(-5, math.log10(8))) for _ in range(2))
        rows.append((l_w * max(n_w, 1), l_l * n_l, n_w, n_l))
    pc, pr = (torch.tensor([r[k] for r in rows], dtype=dtype) for k in (0, 1))
    n_w, n_l = (torch.tensor([r[k] for r in rows]) for k in (2, 3))
    for beta in (0.05, 0.1, 1.0):
        out = orpo_loss(pc, pr, n_w, n_l, beta=beta)
        slow = [slow_orpo(*r, beta) for r in rows]
        close(out.losses, [s[0] for s in slow], tol)
        close(out.metrics["log_odds_chosen"], [s[1] for s in slow], tol)
        close(out.metrics["nll_loss"], [s[2] for s in slow], tol)
        close(out.chosen_rewards, [beta * r[0] / max(r[2], 1) for r in rows], tol)


def test_orpo_gradient_matches_closed_form():
    """d loss / d l_w = -1 - beta * sigma(-z) / (1 - exp(l_w)), d loss / d l_l = beta * sigma(-z) / (1 - exp(l_l))
    (d log odds / d l = 1 / (1 - e^l)); the summed log-prob's gradient is that over |y|."""
    l_w, l_l, n_w, n_l, beta = -0.4, -1.3, 3, 5, 0.2
    pc = torch.tensor([l_w * n_w], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([l_l * n_l], dtype=torch.float64, requires_grad=True)
    orpo_loss(pc, pr, torch.tensor([n_w]), torch.tensor([n_l]), beta=beta).losses.sum().backward()
    _, z, _ = slow_orpo(l_w * n_w, l_l * n_l, n_w, n_l, beta)
    s = 1 / (1 + math.exp(z))  # sigma(-z)
    assert pc.grad.item() == pytest.approx((-1 - beta * s / (1 - math.exp(l_w))) / n_w, rel=1e-12)
    assert pr.grad.item() == pytest.approx(beta * s / (1 - math.exp(l_l)) / n_l, rel=1e-12)


# ---------------------------------------------------------------- TRL


def trl_odds_ratio_loss(chosen_mean_logps, rejected_mean_logps, beta):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` and its ``log1mexp`` (trl 1.16.0,
    trl/experimental/orpo/orpo_trainer.py), restated line by line: inputs are MEAN log-probs; returns
    (beta * log sigma(log_odds) per pair, chosen rewards, rejected rewards, mean log sigma, mean log_odds)."""

    def log1mexp_trl(x):
        t_ = -0.6931471805599453
        return torch.where(x < t_, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (c - r) - (log1mexp_trl(c) - log1mexp_trl(r))
    ratio = torch.nn.functional.logsigmoid(log_odds)
    return beta * ratio, beta * c.detach(), beta * r.detach(), ratio.mean(), log_odds.mean()


# mean log-probs, and TRL 1.16.0's `losses` (beta * log sigma(log odds)) at beta = 0.1 on them, as printed by
# trl.experimental.orpo.ORPOTrainer.odds_ratio_loss; its two means: log_odds_ratio, log_odds_chosen.
TRL_CHOSEN = (-0.05, -0.3, -1.2, -2.5, -0.7, -0.6931, -4e-4)
TRL_REJECTED = (-0.9, -0.1, -3.0, -2.5, -0.69, -0.6932, -0.02)
TRL_LOSSES = (
    -0.0034523874,
    -0.1464776099,
    -0.0114724273,
    -0.0693147182,
    -0.0703178644,
    -0.0693047196,
    -0.0019611071,
)
TRL_MEANS = (-0.5318583250, 1.1651769876)


def _orpo_on_means(chosen, rejected, lengths, beta=0.1):
    """Our loss fed summed log-probs (mean x length) for the given mean log-probs."""
    n = torch.tensor(lengths)
    return orpo_loss(t(*chosen) * n, t(*rejected) * n, n, n, beta=beta)


def test_orpo_matches_trls_recorded_numbers():
    """Our odds-ratio term (loss - NLL) is minus TRL's per-pair ``losses`` (TRL subtracts them from the NLL);
    rewards, log_odds_ratio and log_odds_chosen are TRL's. Lengths vary: our input is summed."""
    lengths = [1, 2, 3, 7, 4, 5, 6]
    out = _orpo_on_means(TRL_CHOSEN, TRL_REJECTED, lengths)
    close(out.losses - out.metrics["nll_loss"], [-v for v in TRL_LOSSES], 2e-6)
    close(out.metrics["nll_loss"], [-v for v in TRL_CHOSEN], 1e-6)
    close(out.chosen_rewards, [0.1 * v for v in TRL_CHOSEN], 1e-6)
    close(out.rejected_rewards, [0.1 * v for v in TRL_REJECTED], 1e-6)
    close(out.metrics["log_odds_ratio"].mean(), TRL_MEANS[0], 2e-6)
    close(out.metrics["log_odds_chosen"].mean(), TRL_MEANS[1], 2e-6)


def test_orpo_matches_trls_formula_on_random_inputs():
    """TRL's formula restated (above), and TRL itself when it imports, on the same random mean log-probs."""
    gen = torch.Generator().manual_seed(0)
    c = -torch.rand(200, generator=gen) * 6 - 1e-4
    r = -torch.rand(200, generator=gen) * 6 - 1e-4
    lengths = torch.randint(1, 30, (200,), generator=gen)
    ours = orpo_loss(c * lengths, r * lengths, lengths, lengths, beta=0.1)
    references = [trl_odds_ratio_loss(c, r, 0.1)]
    try:
        import os
        import types

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    except Exception:  # TRL is not a dependency: its formula restated above is the reference then
        pass
    else:
        fake = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
        references.append(ORPOTrainer.odds_ratio_loss(fake, c, r))
    for losses, chosen_rewards, rejected_rewards, ratio_mean, log_odds_mean in references:
        close(ours.losses - ours.metrics["nll_loss"], -losses, 1e-5)
        close(ours.chosen_rewards, chosen_rewards, 1e-5)
        close(ours.rejected_rewards, rejected_rewards, 1e-5)
        close(ours.metrics["log_odds_ratio"].mean(), ratio_mean, 1e-5)
        close(ours.metrics["log_odds_chosen"].mean(), log_odds_mean, 1e-5)


# ---------------------------------------------------------------- stability


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-7, -1e-5, -0.01, -0.69, -0.7, -5.0, -50.0], dtype=torch.float32)
    expected = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    close(log1mexp(x), expected, 1e-6)


@pytest.mark.parametrize("mean_logp", [0.0, -1e-9, -1e-7, -1e-6, -1e-5, -1e4, -1e30])
def test_orpo_finite_loss_and_gradient_at_the_extremes(mean_logp):
    """A mean log-prob of exactly 0 (an empty response, or a certain one) or near it, and a huge negative
    one: finite loss and gradients, on either side of the pair. Near 0 the log-odds saturate at the clamp's
    -1e-6 - log(1 - exp(-1e-6)) = 13.8155; TRL gives inf there and a NaN gradient."""
    for side in ("chosen", "rejected"):
        pc = torch.tensor([mean_logp if side == "chosen" else -1.0, -2.0], requires_grad=True)
        pr = torch.tensor([mean_logp if side == "rejected" else -1.0, -0.5], requires_grad=True)
        lengths = torch.tensor([1, 1])
        out = orpo_loss(pc, pr, lengths, lengths, beta=0.1)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all(), (side, out.losses)
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (side, pc.grad, pr.grad)
        assert torch.isfinite(out.metrics["log_odds_chosen"]).all()
        if mean_logp >= ORPO_MAX_MEAN_LOGP:
            clamped = ORPO_MAX_MEAN_LOGP - math.log(-math.expm1(ORPO_MAX_MEAN_LOGP))
            assert clamped == pytest.approx(13.8155, abs=1e-4)
            sign = 1 if side == "chosen" else -1
            expected_z = sign * (clamped - (-1.0 - math.log(-math.expm1(-1.0))))
            assert out.metrics["log_odds_chosen"][0].item() == pytest.approx(expected_z, abs=1e-4)
    # an empty chosen response (sum 0, length 0, clamped to 1): finite, the NLL term is 0
    out = orpo_loss(t(0.0), t(-3.0), torch.tensor([0]), torch.tensor([2]), beta=0.1)
    assert torch.isfinite(out.losses).all() and out.metrics["nll_loss"].item() == 0.0


# ---------------------------------------------------------------- registry, config


def test_orpo_is_a_reference_free_pair_method():
    method = PAIR_METHODS["orpo"]
    assert method.loss is orpo_loss and method.reference_free
    assert method.inputs == (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
    )


def test_orpo_config_section():
    base = {"method": "orpo", "data": {"train": "x.jsonl"}}
    assert train_config_from_dict(base).method_config == ORPOConfig(beta=0.1)
    assert train_config_from_dict({**base, "orpo": {"beta": 0.25}}).orpo.beta == 0.25
    with pytest.raises(ConfigError, match="orpo.beta must be > 0"):
        train_config_from_dict({**base, "orpo": {"beta": 0.0}})
    with pytest.raises(ConfigError, match="orpo.*method is 'dpo'"):
        train_config_from_dict({**base, "method": "dpo", "orpo": {"beta": 0.1}})
    with pytest.raises(ValueError, match="beta must be > 0"):
        orpo_loss(t(-1.0), t(-2.0), torch.tensor([1]), torch.tensor([1]), beta=0.0)


# ---------------------------------------------------------------- end to end


def test_orpo_trains_without_a_reference(tmp_path, tiny_model_dir, tiny_tokenizer, data8, monkeypatch):  # noqa: F811
    """Step 1's loss is the hand-computed ORPO loss of the starting model on step 1's pairs (mean over the
    pairs of -l_w + beta * softplus(-z)); no reference model is built or run; the model moves."""

    def no_reference(*args, **kwargs):
        raise AssertionError("ORPO must not build a reference model")

    monkeypatch.setattr(run_module, "build_reference", no_reference)
    out = train(
        make_cfg(tiny_model_dir, data8, tmp_path / "run", method="orpo", orpo={"beta": 0.5}), log=quiet
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert STANDARD_KEYS | ORPO_METRICS <= row.keys()
        assert all(math.isfinite(row[k]) for k in STANDARD_KEYS | ORPO_METRICS)
    assert not (out / "ref_logps.safetensors").exists()

    from transformers import AutoModelForCausalLM

    from preftune.training.loop import StepPlan

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    _, (first,) = StepPlan(8, 2, 1, 0).step(0)  # step 1's pairs (examples are the file's lines)
    records = pair_records(8)
    losses, nlls = [], []
    for i in first:
        p = prompt_ids(tiny_tokenizer, records[i]["prompt"])
        chosen, rejected = (response_ids(tiny_tokenizer, records[i][k]) for k in ("chosen", "rejected"))
        pc, pr = hand_logps(base, p, chosen), hand_logps(base, p, rejected)
        loss, _, nll = slow_orpo(pc, pr, len(chosen), len(rejected), 0.5)
        losses.append(loss)
        nlls.append(nll)
    assert rows[0]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert rows[0]["nll_loss"] == pytest.approx(sum(nlls) / len(nlls), abs=1e-4)
    assert max_change(weights(out / "model"), weights(tiny_model_dir)) > 1e-4
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_orpo_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data8):  # noqa: F811
    sections = {"method": "orpo", "training": {"max_steps": 4, "save_every": 2}}
    run_a = train(make_cfg(tiny_model_dir, data8, tmp_path / "a", **sections), log=quiet)
    cfg_b = make_cfg(tiny_model_dir, data8, tmp_path / "b", **sections)

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, on_step_end=interrupt, log=quiet)
    train(cfg_b, resume=True, log=quiet)
    wa, wb = (load_file(run / "model" / "model.safetensors") for run in (run_a, tmp_path / "b"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows_a, rows_b = metrics(run_a), metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ra.pop("tokens_per_s"), rb.pop("tokens_per_s")
        assert ra == rb
