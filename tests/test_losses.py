"""preftune.losses: known values (arithmetic in the docstrings), slow-reference parity, identities, errors."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    PAIR_LOSSES,
    LossOutput,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    odpo_loss,
    odpo_offset,
    orpo_loss,
    pair_metrics,
    rpo_loss,
    simpo_loss,
)

LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- slow references: python floats and math


def slow_logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def slow_h(pc: float, pr: float, rc: float, rr: float) -> float:
    return (pc - rc) - (pr - rr)


def slow_dpo(pc, pr, rc, rr, beta, eps=0.0):
    h = slow_h(pc, pr, rc, rr)
    return -(1 - eps) * slow_logsigmoid(beta * h) - eps * slow_logsigmoid(-beta * h)


def slow_ipo(pc, pr, rc, rr, beta):
    return (slow_h(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


def slow_hinge(pc, pr, rc, rr, beta):
    return max(0.0, 1 - beta * slow_h(pc, pr, rc, rr))


def slow_rpo(pc, pr, rc, rr, n_w, beta, alpha):
    return slow_dpo(pc, pr, rc, rr, beta) + alpha * (-pc) / max(n_w, 1)


def slow_odpo(pc, pr, rc, rr, s_w, s_l, beta, alpha, offset):
    delta = {
        "log": lambda: alpha * math.log(s_w - s_l),
        "identity": lambda: alpha * (s_w - s_l),
        "log_ratio": lambda: alpha * (math.log(s_w) - math.log(s_l)),
    }[offset]()
    return -slow_logsigmoid(beta * slow_h(pc, pr, rc, rr) - delta)


def slow_simpo(pc, pr, n_w, n_l, beta, gamma):
    return -slow_logsigmoid(beta * pc / max(n_w, 1) - beta * pr / max(n_l, 1) - gamma)


def slow_bt(r_w, r_l, m=0.0):
    return -slow_logsigmoid(r_w - r_l - m)


def rows(*tensors: torch.Tensor) -> list[tuple[float, ...]]:
    return list(zip(*(x.tolist() for x in tensors)))


@pytest.fixture
def batch():
    """A seeded batch of 64 pairs: log-probs in [-5, 0], lengths 0..12 (zeros included), scores."""
    g = torch.Generator().manual_seed(1234)
    b = 64
    logps = [-5 * torch.rand(b, generator=g) for _ in range(4)]
    lengths = [torch.randint(0, 13, (b,), generator=g) for _ in range(2)]
    s_l = 0.5 + torch.rand(b, generator=g)  # (0.5, 1.5)
    s_w = s_l + 0.01 + torch.rand(b, generator=g)  # strictly greater, all positive
    return (*logps, *lengths, s_w, s_l)


# ---------------------------------------------------------------- known values


def test_dpo_is_ln2_when_policy_equals_reference():
    """h = 0, so loss = -log sigma(0) = ln 2 for every beta; rewards are 0."""
    x = t(-3.0, -17.5, -0.25)
    for beta in (0.01, 0.1, 1.0, 10.0):
        out = dpo_loss(x, x - 1, x, x - 1, beta=beta)
        close(out.losses, [LN2] * 3)
        close(out.chosen_rewards, [0.0] * 3)
        close(out.rejected_rewards, [0.0] * 3)


def test_dpo_hand_value():
    """pc=-10, rc=-11, pr=-12, rr=-12: h = (1) - (0) = 1; beta=0.5: -log sigma(0.5) = 0.474077.

    Rewards: 0.5 * (-10 - -11) = 0.5 and 0.5 * (-12 - -12) = 0.
    """
    out = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-12.0), beta=0.5)
    close(out.losses, [0.47407698418010663])
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [0.0])


def test_cdpo_hand_value():
    """h=1, beta=0.5, eps=0.1: 0.9 * -log sigma(0.5) + 0.1 * -log sigma(-0.5)
    = 0.9 * 0.474077 + 0.1 * (0.474077 + 0.5) = 0.474077 + 0.05 = 0.524077."""
    out = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-12.0), beta=0.5, label_smoothing=0.1)
    close(out.losses, [0.47407698418010663 + 0.05])


def test_ipo_hand_values():
    """h=1, beta=0.5: (1 - 1)^2 = 0;  h=1, beta=0.1: (1 - 5)^2 = 16;  h=3, beta=0.25: (3 - 2)^2 = 1."""
    one = (t(-10.0), t(-12.0), t(-11.0), t(-12.0))  # h = 1
    three = (t(-8.0), t(-12.0), t(-11.0), t(-12.0))  # h = 3
    close(ipo_loss(*one, beta=0.5).losses, [0.0])
    close(ipo_loss(*one, beta=0.1).losses, [16.0])
    close(ipo_loss(*three, beta=0.25).losses, [1.0])


def test_hinge_hand_values_including_zero_region():
    """beta=0.5, h = 1, 2, 3, -2: max(0, 1 - 0.5h) = 0.5, 0 (boundary), 0 (beyond), 2."""
    zero = t(0.0, 0.0, 0.0, 0.0)
    out = hinge_loss(t(1.0, 2.0, 3.0, -2.0), zero, zero, zero, beta=0.5)
    close(out.losses, [0.5, 0.0, 0.0, 2.0])


def test_rpo_hand_value():
    """pc=-10, rc=-12, pr=-15, rr=-14: h = 2 - (-1) = 3; beta=0.1: DPO = -log sigma(0.3) = 0.554355;
    |y_w| = 5: NLL/|y_w| = 10/5 = 2; alpha=0.5: loss = 0.554355 + 0.5 * 2 = 1.554355."""
    out = rpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), torch.tensor([5]), beta=0.1, alpha=0.5)
    close(out.losses, [0.5543552444685271 + 1.0])
    close(out.chosen_rewards, [0.2])  # 0.1 * (-10 - -12)
    close(out.rejected_rewards, [-0.1])  # 0.1 * (-15 - -14)


def test_simpo_hand_value():
    """pc=-6, |y_w|=3 -> -2 per token; pr=-12, |y_l|=4 -> -3; beta=2: 2*(-2) - 2*(-3) = 2; gamma=1:
    loss = -log sigma(2 - 1) = 0.313262; rewards are -4 and -6."""
    out = simpo_loss(t(-6.0), t(-12.0), torch.tensor([3]), torch.tensor([4]), beta=2.0, gamma=1.0)
    close(out.losses, [0.3132616875182228])
    close(out.chosen_rewards, [-4.0])
    close(out.rejected_rewards, [-6.0])


def test_bradley_terry_hand_values():
    """r_w=2, r_l=0.5: -log sigma(1.5) = 0.201413; with m=1: -log sigma(0.5) = 0.474077."""
    out = bradley_terry_loss(t(2.0), t(0.5))
    close(out.losses, [0.2014132779827524])
    close(out.chosen_rewards, [2.0])
    close(out.rejected_rewards, [0.5])
    close(bradley_terry_loss(t(2.0), t(0.5), margin=t(1.0)).losses, [0.47407698418010663])


@pytest.mark.parametrize(
    ("offset", "s_w", "s_l", "alpha", "delta", "loss"),
    [
        # Delta = log(3 - 1) = ln 2; loss = -log sigma(1 - ln 2) = log(1 + e^-(0.306853)) = 0.551445
        ("log", 3.0, 1.0, 1.0, LN2, 0.5514447139320511),
        # Delta = 3 - 1 = 2; loss = -log sigma(1 - 2) = log(1 + e) = 1.313262
        ("identity", 3.0, 1.0, 1.0, 2.0, 1.3132616875182228),
        # Delta = 0.5 * (log 4 - log 2) = 0.5 ln 2; loss = -log sigma(1 - 0.346574) = 0.418881
        ("log_ratio", 4.0, 2.0, 0.5, 0.5 * LN2, 0.4188814353662957),
    ],
)
def test_odpo_hand_values(offset, s_w, s_l, alpha, delta, loss):
    """h = 1 (pc=-10, rc=-11, pr=rr=-12), beta = 1; loss = -log sigma(beta h - Delta)."""
    close(odpo_offset(t(s_w), t(s_l), alpha=alpha, offset=offset), [delta])
    out = odpo_loss(
        t(-10.0), t(-12.0), t(-11.0), t(-12.0), t(s_w), t(s_l), beta=1.0, alpha=alpha, offset=offset
    )
    close(out.losses, [loss])
    close(out.chosen_rewards, [1.0])
    close(out.rejected_rewards, [0.0])


# ---------------------------------------------------------------- parity with the slow references


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_reference_losses_match_slow_implementation(batch, beta):
    pc, pr, rc, rr, n_w, _, s_w, s_l = batch
    four = rows(pc, pr, rc, rr)
    close(dpo_loss(pc, pr, rc, rr, beta=beta).losses, [slow_dpo(*r, beta) for r in four])
    cdpo = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2).losses
    close(cdpo, [slow_dpo(*r, beta, 0.2) for r in four])
    close(ipo_loss(pc, pr, rc, rr, beta=beta).losses, [slow_ipo(*r, beta) for r in four])
    close(hinge_loss(pc, pr, rc, rr, beta=beta).losses, [slow_hinge(*r, beta) for r in four])
    rpo = rpo_loss(pc, pr, rc, rr, n_w, beta=beta, alpha=0.7).losses
    close(rpo, [slow_rpo(*r, beta, 0.7) for r in rows(pc, pr, rc, rr, n_w)])
    for offset in ("log", "identity", "log_ratio"):
        odpo = odpo_loss(pc, pr, rc, rr, s_w, s_l, beta=beta, alpha=0.8, offset=offset).losses
        expected = [slow_odpo(*r, beta, 0.8, offset) for r in rows(pc, pr, rc, rr, s_w, s_l)]
        close(odpo, expected)


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.6), (10.0, 5.0), (2.5, 0.0)])
def test_simpo_matches_slow_implementation(batch, beta, gamma):
    pc, pr, _, _, n_w, n_l, _, _ = batch
    out = simpo_loss(pc, pr, n_w, n_l, beta=beta, gamma=gamma)
    close(out.losses, [slow_simpo(*r, beta, gamma) for r in rows(pc, pr, n_w, n_l)])
    close(out.chosen_rewards, [beta * p / max(n, 1) for p, n in rows(pc, n_w)])


def test_bradley_terry_matches_slow_implementation(batch):
    r_w, r_l, m = 3 * batch[0], 3 * batch[1], batch[2].abs()
    close(bradley_terry_loss(r_w, r_l).losses, [slow_bt(a, b) for a, b in rows(r_w, r_l)])
    close(bradley_terry_loss(r_w, r_l, m).losses, [slow_bt(*r) for r in rows(r_w, r_l, m)])


# ---------------------------------------------------------------- identities and invariances


def test_swapping_chosen_and_rejected_flips_the_margin(batch):
    """Swapping y_w and y_l sends h to -h. DPO: loss(-h) - loss(h) = log sigma(bh) - log sigma(-bh) = bh.
    IPO: (-h - c)^2 - (h - c)^2 = 4hc = 2h/beta with c = 1/(2 beta). BT: the same identity as DPO."""
    pc, pr, rc, rr, n_w, n_l, _, _ = batch
    beta = 0.5
    h = (pc - rc) - (pr - rr)
    pair = dict(beta=beta)
    for loss_fn in (dpo_loss, ipo_loss, hinge_loss):
        out, swapped = loss_fn(pc, pr, rc, rr, **pair), loss_fn(pr, pc, rr, rc, **pair)
        close(swapped.chosen_rewards - swapped.rejected_rewards, -(out.chosen_rewards - out.rejected_rewards))
    close(dpo_loss(pr, pc, rr, rc, **pair).losses - dpo_loss(pc, pr, rc, rr, **pair).losses, beta * h, 1e-5)
    close(
        ipo_loss(pr, pc, rr, rc, **pair).losses - ipo_loss(pc, pr, rc, rr, **pair).losses, 2 * h / beta, 1e-5
    )
    simpo, simpo_swapped = (
        simpo_loss(pc, pr, n_w, n_l, beta=2.0, gamma=1.0),
        simpo_loss(pr, pc, n_l, n_w, beta=2.0, gamma=1.0),
    )
    close(simpo_swapped.chosen_rewards, simpo.rejected_rewards)
    close(simpo_swapped.rejected_rewards, simpo.chosen_rewards)
    bt, bt_swapped = bradley_terry_loss(pc, pr), bradley_terry_loss(pr, pc)
    close(bt_swapped.losses - bt.losses, pc - pr, 1e-5)


def test_odpo_with_alpha_zero_is_exactly_dpo(batch):
    pc, pr, rc, rr, _, _, s_w, s_l = batch
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.3)
    for offset in ("log", "identity", "log_ratio"):
        odpo = odpo_loss(pc, pr, rc, rr, s_w, s_l, beta=0.3, alpha=0.0, offset=offset)
        assert torch.equal(odpo.losses, dpo.losses)
        assert torch.equal(odpo.chosen_rewards, dpo.chosen_rewards)
        assert torch.equal(odpo.rejected_rewards, dpo.rejected_rewards)


def test_rpo_with_alpha_zero_is_dpo_and_rewards_match(batch):
    pc, pr, rc, rr, n_w, _, _, _ = batch
    dpo, rpo = dpo_loss(pc, pr, rc, rr, beta=0.2), rpo_loss(pc, pr, rc, rr, n_w, beta=0.2, alpha=0.0)
    close(rpo.losses, dpo.losses)
    assert torch.equal(rpo.chosen_rewards, dpo.chosen_rewards)


def test_rewards_are_detached():
    pc = t(-1.0, -2.0).requires_grad_()
    outs = [
        dpo_loss(pc, pc - 1, pc.detach(), pc.detach(), beta=0.1),
        simpo_loss(pc, pc - 1, torch.tensor([1, 2]), torch.tensor([1, 2]), beta=2.0, gamma=1.0),
        bradley_terry_loss(pc, pc - 1),
    ]
    for out in outs:
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_low_precision_inputs_are_computed_in_float32():
    x = torch.tensor([-3.0, -4.0], dtype=torch.bfloat16)
    out = dpo_loss(x, x, x, x, beta=0.1)
    assert out.losses.dtype == torch.float32
    close(out.losses, [LN2, LN2])


# ---------------------------------------------------------------- gradients and numerical stability


def test_dpo_gradient_at_reference_is_minus_beta_over_two():
    """d/d pc of -log sigma(beta h) = -beta * sigma(-beta h); at h = 0 that is -beta/2 (and +beta/2 for pr)."""
    beta = 0.3
    pc, pr = t(-5.0, -9.0).requires_grad_(), t(-7.0, -2.0).requires_grad_()
    dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=beta).losses.sum().backward()
    close(pc.grad, [-beta / 2] * 2)
    close(pr.grad, [beta / 2] * 2)


def test_huge_margins_give_finite_losses_and_gradients():
    """|h| = 1e4 with beta = 1: -log sigma(1e4) ~ 0 and -log sigma(-1e4) ~ 1e4 (no overflow to inf)."""
    zero = t(0.0, 0.0)
    pc = t(1e4, -1e4).requires_grad_()
    s_w, s_l = t(2.0, 2.0), t(1.0, 1.0)
    lengths = torch.tensor([1, 1])
    outs = {
        "dpo": dpo_loss(pc, zero, zero, zero, beta=1.0),
        "cdpo": dpo_loss(pc, zero, zero, zero, beta=1.0, label_smoothing=0.1),
        "ipo": ipo_loss(pc, zero, zero, zero, beta=1.0),
        "hinge": hinge_loss(pc, zero, zero, zero, beta=1.0),
        "rpo": rpo_loss(pc, zero, zero, zero, lengths, beta=1.0, alpha=1.0),
        "odpo": odpo_loss(pc, zero, zero, zero, s_w, s_l, beta=1.0),
        "simpo": simpo_loss(pc, zero, lengths, lengths, beta=1.0, gamma=1.0),
        "bt": bradley_terry_loss(pc, zero),
    }
    for name, out in outs.items():
        assert torch.isfinite(out.losses).all(), name
        (grad,) = torch.autograd.grad(out.losses.sum(), pc)
        assert torch.isfinite(grad).all(), name
    close(outs["dpo"].losses, [0.0, 1e4])
    close(outs["bt"].losses, [0.0, 1e4])


def test_fully_truncated_responses_give_finite_output():
    """Zero lengths are clamped to 1: the same values as lengths of 1, never NaN or inf."""
    pc, pr = t(-3.0, -6.0), t(-4.0, -1.0)
    zeros, ones = torch.tensor([0, 0]), torch.tensor([1, 1])
    simpo0 = simpo_loss(pc, pr, zeros, zeros, beta=2.0, gamma=1.0)
    assert torch.isfinite(simpo0.losses).all() and torch.isfinite(simpo0.chosen_rewards).all()
    close(simpo0.losses, simpo_loss(pc, pr, ones, ones, beta=2.0, gamma=1.0).losses)
    rpo0 = rpo_loss(pc, pr, pc, pr, zeros, beta=0.1, alpha=1.0)
    close(rpo0.losses, [LN2 + 3.0, LN2 + 6.0])  # DPO = ln 2 at h = 0, NLL / max(0, 1) = -pc


# ---------------------------------------------------------------- ODPO domain and argument errors


def test_odpo_tie_with_log_offset_names_the_row():
    s_w, s_l = t(2.0, 3.0, 1.5, 0.7, 4.0), t(1.0, 1.0, 1.0, 0.7, 1.0)
    with pytest.raises(ValueError, match="drop ties or use offset='identity'") as info:
        odpo_offset(s_w, s_l, offset="log")
    assert "rows [3] with (chosen, rejected) scores [(0.7, 0.7)]" in str(info.value)
    close(odpo_offset(s_w, s_l, offset="identity"), [1.0, 2.0, 0.5, 0.0, 3.0])  # ties are fine here


def test_odpo_reversed_pair_with_log_offset_is_an_error():
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        odpo_offset(t(1.0, 3.0), t(2.0, 1.0), offset="log")


def test_odpo_negative_score_with_log_ratio_names_the_row():
    with pytest.raises(ValueError, match="log_ratio") as info:
        odpo_offset(t(2.0, 3.0, 1.0), t(1.0, 1.0, -0.5), offset="log_ratio")
    assert "rows [2]" in str(info.value) and "-0.5" in str(info.value)


def test_odpo_nan_score_names_the_row_for_every_offset():
    s_w, s_l = t(2.0, 3.0, 4.0, 5.0, float("nan")), t(1.0, 1.0, 1.0, 1.0, 1.0)
    for offset in ("log", "identity", "log_ratio"):
        with pytest.raises(ValueError, match="finite") as info:
            odpo_offset(s_w, s_l, offset=offset)
        assert "rows [4]" in str(info.value) and "nan" in str(info.value)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        odpo_loss(
            t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), t(2.0, float("inf")), t(1.0, 1.0), beta=0.1
        )


def test_odpo_error_lists_first_ten_rows_and_the_count():
    with pytest.raises(ValueError, match="30 bad row") as info:
        odpo_offset(torch.ones(30), torch.ones(30), offset="log")
    assert "rows [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in str(info.value)


def test_argument_errors():
    x = t(-1.0, -2.0)
    with pytest.raises(ValueError, match="log, identity, log_ratio"):
        odpo_offset(x, x - 1, offset="sqrt")
    with pytest.raises(ValueError, match="alpha"):
        odpo_offset(x, x - 1, alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        rpo_loss(x, x, x, x, torch.tensor([1, 1]), beta=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=-0.1)
    for loss_fn in (dpo_loss, ipo_loss, hinge_loss):
        with pytest.raises(ValueError, match="beta"):
            loss_fn(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(x, x, torch.tensor([1, 1]), torch.tensor([1, 1]), beta=-2.0, gamma=1.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, x, x, x.unsqueeze(1), beta=0.1)  # (B,) vs (B, 1) would silently broadcast to (B, B)


# ---------------------------------------------------------------- metrics and registry


def test_pair_metrics_hand_values():
    """rewards chosen (1, -1, 2), rejected (0, 0, 2): margins (1, -1, 0) -> mean 0; accuracy 1/3 (strict)."""
    out = LossOutput(
        losses=t(0.5, 1.0, 1.5), chosen_rewards=t(1.0, -1.0, 2.0), rejected_rewards=t(0.0, 0.0, 2.0)
    )
    metrics = pair_metrics(out, t(-10.0, -20.0, -30.0), t(-1.0, -2.0, -3.0))
    expected = {
        "loss": 1.0,
        "rewards/chosen": 2 / 3,
        "rewards/rejected": 2 / 3,
        "rewards/margins": 0.0,
        "rewards/accuracies": 1 / 3,
        "logps/chosen": -20.0,
        "logps/rejected": -2.0,
    }
    assert metrics == pytest.approx(expected, abs=1e-6)


def test_pair_metrics_for_a_reward_model_omits_logps():
    metrics = pair_metrics(bradley_terry_loss(t(2.0, 0.0), t(0.5, 1.0)))
    assert set(metrics) == {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    }
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    assert metrics["rewards/margins"] == pytest.approx(0.25)  # (1.5 + -1) / 2


def test_pair_loss_registry():
    assert PAIR_LOSSES == {
        "dpo": dpo_loss,
        "ipo": ipo_loss,
        "hinge": hinge_loss,
        "rpo": rpo_loss,
        "odpo": odpo_loss,
        "simpo": simpo_loss,
        "orpo": orpo_loss,
    }


def test_float64_inputs_keep_float64():
    """Scores 1.00000001 vs 1.0 are distinct in float64 (a tie in float32): ODPO's log offset stays defined."""
    s_w = torch.tensor([1.00000001], dtype=torch.float64)
    s_l = torch.tensor([1.0], dtype=torch.float64)
    delta = odpo_offset(s_w, s_l, offset="log")
    assert delta.dtype == torch.float64 and float(delta) == pytest.approx(math.log(1e-8), rel=1e-6)
    z = torch.zeros(1)
    out = odpo_loss(z, z, z, z, s_w, s_l, beta=0.1)
    assert out.losses.dtype == torch.float64
    # h = 0, Δ = log(1e-8): loss = -log σ(-Δ) = log(1 + 1e-8)
    assert float(out.losses) == pytest.approx(math.log1p(1e-8), rel=1e-6)
    lp = torch.tensor([-1.25], dtype=torch.float64)
    assert dpo_loss(lp, lp, lp, lp, beta=0.1).losses.dtype == torch.float64
    assert dpo_loss(lp.half(), lp.half(), lp.half(), lp.half(), beta=0.1).losses.dtype == torch.float32
