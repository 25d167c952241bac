"""The papers' claims decided from hand-made result rows: every verdict of every claim, with the arithmetic
in the comments."""

from __future__ import annotations

import math

import pytest

from preftune.experiments.claims import (
    HELD,
    NOT_HELD,
    NOT_SEPARABLE,
    claim_above_base,
    claim_dpo_vs_ppo,
    claim_kl_grows,
    claim_odpo_vs_dpo,
    claim_simpo_agreement,
    claims_markdown,
    compare_at_equal_kl,
    evaluate_claims,
    format_claims,
    interpolation_weights,
    verdict,
)


def row(method, beta, reward, kl, *, reward_se=0.01, kl_se=0.1, pairs=None, **extra):
    return {
        "method": method,
        "beta": beta,
        "reward_mean": reward,
        "reward_se": reward_se,
        "kl_mean": kl,
        "kl_se": kl_se,
        "pairs": pairs,
        **extra,
    }


BASE = row("base", None, 1.10, 0.0, reward_se=0.02, kl_se=0.0)


def test_verdict_rule():
    assert verdict(0.5, 0.2) == HELD  # 0.5 > 0.4
    assert verdict(-0.5, 0.2) == NOT_HELD
    assert verdict(0.4, 0.2) == NOT_SEPARABLE  # exactly 2 SE is not beyond it
    assert verdict(0.0, 0.0) == NOT_SEPARABLE
    assert verdict(1e-9, 0.0) == HELD


def test_interpolation_weights():
    assert interpolation_weights([1.0, 3.0], 1.5) == pytest.approx([0.75, 0.25])
    assert interpolation_weights([1.0, 3.0, 4.0], 3.5) == pytest.approx([0.0, 0.5, 0.5])
    assert interpolation_weights([2.0], 7.0) == [1.0]
    assert interpolation_weights([1.0, 3.0], 0.0) == [1.0, 0.0]  # clamped
    assert interpolation_weights([1.0, 2.0, 2.0, 3.0], 2.0) == [0.0, 0.0, 1.0, 0.0]  # a repeated KL: no 0/0


def test_equal_kl_over_the_overlapping_range():
    # A: (1, 1.2) (3, 1.6); B: (2, 1.1) (4, 1.3); overlap [2, 3]. Mean over it of A's line: 1.5 (its value at
    # KL 2.5), of B's: 1.15 -> d 0.35. Mean weights A [0.25, 0.75], B [0.75, 0.25]; every SE 0.01
    # -> se = 0.01 * sqrt(2 * (0.25² + 0.75²)) = 0.01 * sqrt(1.25)
    a = [row("odpo", 0.5, 1.2, 1.0), row("odpo", 0.1, 1.6, 3.0)]
    b = [row("dpo", 0.5, 1.1, 2.0), row("dpo", 0.1, 1.3, 4.0)]
    c = compare_at_equal_kl(a, b)
    assert c["basis"] == "overlap" and c["verdict"] == HELD
    assert c["difference"] == pytest.approx(0.35) and c["se"] == pytest.approx(0.01 * math.sqrt(1.25))
    assert "2.00–3.00" in c["detail"]
    swapped = compare_at_equal_kl(b, a)
    assert swapped["verdict"] == NOT_HELD and swapped["difference"] == pytest.approx(-0.35)


def test_equal_kl_single_point_inside_the_other_frontier():
    # PPO (2, 1.25 ± 0.02) inside DPO's (1, 1.2) - (3, 1.6): DPO at KL 2 is 1.4 ± 0.01·√0.5
    dpo = [row("dpo", 0.5, 1.2, 1.0), row("dpo", 0.1, 1.6, 3.0)]
    ppo = [row("ppo", 0.05, 1.25, 2.0, reward_se=0.02)]
    c = compare_at_equal_kl(dpo, ppo)
    assert c["difference"] == pytest.approx(0.15) and c["se"] == pytest.approx(math.sqrt(0.5e-4 + 4e-4))
    assert c["verdict"] == HELD and "at KL 2.00" in c["detail"]


def test_equal_kl_nearest_points_within_noise():
    # KLs 2.0 and 2.1, each ± 0.2: ΔKL -0.1 within 2·0.283, so the rewards compare directly
    a = [row("odpo", 0.1, 1.30, 2.0, reward_se=0.05, kl_se=0.2)]
    b = [row("dpo", 0.1, 1.32, 2.1, reward_se=0.05, kl_se=0.2)]
    c = compare_at_equal_kl(a, b)
    assert c["basis"] == "nearest" and c["verdict"] == NOT_SEPARABLE
    assert c["difference"] == pytest.approx(-0.02) and c["se"] == pytest.approx(0.05 * math.sqrt(2))
    low = [row("odpo", 0.1, 1.00, 2.0, kl_se=0.2)]
    assert compare_at_equal_kl(low, b)["verdict"] == NOT_HELD  # -0.32 ± 0.05·... well below


def test_equal_kl_frontiers_apart_are_not_separable():
    # KL 1.0 vs 3.0 (± 0.01): reward gain per nat over the base (1.1 ± 0.02): 0.5 vs 0.4/3, d = 0.3667,
    # se ≈ 0.030 — beyond 2 SE, and still not separable: rewards at different KLs say nothing here
    a = [row("odpo", 0.1, 1.6, 1.0, reward_se=0.02, kl_se=0.01)]
    b = [row("dpo", 0.1, 1.5, 3.0, reward_se=0.02, kl_se=0.01)]
    c = compare_at_equal_kl(a, b, BASE)
    assert c["basis"] == "apart" and c["verdict"] == NOT_SEPARABLE
    assert c["difference"] == pytest.approx(0.5 - 0.4 / 3) and c["difference"] > 2 * c["se"]
    assert "do not overlap" in c["detail"]
    no_base = compare_at_equal_kl(a, b)
    assert no_base["difference"] is None and no_base["verdict"] == NOT_SEPARABLE


def test_claim_a_dpo_vs_ppo_present_only_with_both():
    dpo = [row("dpo", 0.5, 1.2, 1.0), row("dpo", 0.1, 1.6, 3.0)]
    assert claim_dpo_vs_ppo([BASE, *dpo]) == []  # no PPO: skipped
    (c,) = claim_dpo_vs_ppo([BASE, *dpo, row("ppo", 0.05, 1.25, 2.0, reward_se=0.02)])
    assert (c["claim"], c["verdict"]) == ("a", HELD)
    (c,) = claim_dpo_vs_ppo([BASE, *dpo, row("ppo", 0.05, 1.50, 2.0, reward_se=0.02)])
    assert c["verdict"] == NOT_HELD  # 1.4 - 1.5 = -0.1 ± 0.021


def test_claim_b_odpo_vs_dpo_per_pairs_setting_and_with_fewer_pairs():
    small = {"pairs_mode": "all", "n_pairs": 48}
    large = {"pairs_mode": "all", "n_pairs": 300}
    rows = [
        BASE,
        # default pairs: ODPO 1.42 at KL 2 vs DPO 1.40 there -> 0.02 ± 0.017: not separable
        row("dpo", 0.5, 1.2, 1.0, pairs_mode="best_vs_worst", n_pairs=64),
        row("dpo", 0.1, 1.6, 3.0, pairs_mode="best_vs_worst", n_pairs=64),
        row("odpo", 0.1, 1.42, 2.0, pairs_mode="best_vs_worst", n_pairs=64),
        # 300 pairs: 1.62 vs 1.60 at KLs equal within noise -> 0.02 ± 0.014
        row("dpo", 0.1, 1.60, 4.0, pairs="all", **large),
        row("odpo", 0.1, 1.62, 4.1, pairs="all", **large),
        # 48 pairs: 1.35 vs 1.20 -> 0.15 ± 0.014: held
        row("dpo", 0.1, 1.20, 2.0, pairs="all-n48", **small),
        row("odpo", 0.1, 1.35, 2.05, pairs="all-n48", **small),
        row("odpo", 0.1, 1.35, 2.05, pairs="bvw-only-odpo"),  # no DPO on these pairs: no claim
    ]
    default, all_pairs, few, fewer_gap = claim_odpo_vs_dpo(rows)
    assert default["scope"] == "default pairs (64 pairs)" and default["verdict"] == NOT_SEPARABLE
    assert all_pairs["scope"] == "pairs all (300 pairs)" and all_pairs["verdict"] == NOT_SEPARABLE
    assert few["scope"] == "pairs all-n48 (48 pairs)" and few["verdict"] == HELD
    # gain with 48 pairs minus gain with 300: 0.15 - 0.02 = 0.13 ± sqrt(2e-4 + 2e-4)
    assert fewer_gap["statement"] == "ODPO's gain over DPO is larger with fewer pairs"
    assert fewer_gap["difference"] == pytest.approx(0.13) and fewer_gap["se"] == pytest.approx(0.02)
    assert fewer_gap["verdict"] == HELD and fewer_gap["scope"] == "all pairs, 48 vs 300"
    reversed_gap = claim_odpo_vs_dpo([BASE, *rows[4:6], {**rows[6], "reward_mean": 1.40}, rows[7]])[-1]
    assert reversed_gap["verdict"] == NOT_HELD  # -0.05 - 0.02 = -0.07 ± 0.02


def test_claim_c_above_base():
    rows = [
        BASE,
        row("dpo", 0.1, 1.30, 1.5),  # +0.20 ± 0.022: held
        row("ipo", 0.1, 1.12, 1.0, reward_se=0.02),  # +0.02 ± 0.028: not separable
        row("simpo", 2.0, 1.05, 0.5),  # -0.05 ± 0.022: not held
    ]
    verdicts = [(c["scope"], c["verdict"]) for c in claim_above_base(rows)]
    assert verdicts == [("dpo β=0.1", HELD), ("ipo β=0.1", NOT_SEPARABLE), ("simpo β=2", NOT_HELD)]
    assert "at KL 1.50 ± 0.10 nats" in claim_above_base(rows)[0]["detail"]
    assert claim_above_base(rows[1:]) == []  # no base row


def test_claim_d_kl_grows_as_beta_shrinks():
    rows = [
        BASE,
        row("dpo", 0.5, 1.3, 1.19),
        row("dpo", 0.05, 1.4, 2.94),
        row("dpo", 0.1, 1.3, 2.30),  # KL 1.19 -> 2.30 -> 2.94 as β 0.5 -> 0.1 -> 0.05: held, monotone
        row("ipo", 0.5, 1.2, 1.5, kl_se=0.05),
        row("ipo", 0.1, 1.2, 1.0, kl_se=0.05),  # KL falls: -0.5 ± 0.07, not held
        row("odpo", 0.5, 1.2, 1.0),
        row("odpo", 0.05, 1.2, 0.9),
        row("odpo", 0.1, 1.2, 1.2),  # 1.0, 1.2, 0.9: -0.1 ± 0.14, not separable, not monotone
        row("simpo", 2.0, 1.2, 1.0),  # one β: no claim
    ]
    dpo, ipo, odpo = claim_kl_grows(rows)
    assert (dpo["scope"], dpo["verdict"], dpo["monotone"]) == ("dpo", HELD, True)
    assert dpo["difference"] == pytest.approx(2.94 - 1.19)
    assert "β=0.5: 1.19, β=0.1: 2.30, β=0.05: 2.94" in dpo["detail"]
    assert (ipo["verdict"], ipo["monotone"]) == (NOT_HELD, False)
    assert (odpo["verdict"], odpo["monotone"]) == (NOT_SEPARABLE, False)


def test_claim_e_simpo_agreement():
    rows = [
        row("simpo", 2.0, 1.2, 1.0, logp_agreement=0.60, logp_agreement_se=0.03),  # +0.10 ± 0.03
        row("simpo", 5.0, 1.2, 1.0, logp_agreement=0.55, logp_agreement_se=0.03),  # +0.05 ± 0.03
        row("simpo", 10.0, 1.2, 1.0, logp_agreement=0.40, logp_agreement_se=0.03),  # -0.10 ± 0.03
        row("simpo", 20.0, 1.2, 1.0, logp_agreement=0.90),  # no SE: cannot be decided
        row("dpo", 0.1, 1.2, 1.0, logp_agreement=0.90, logp_agreement_se=0.01),  # not SimPO
    ]
    assert [c["verdict"] for c in claim_simpo_agreement(rows)] == [
        HELD,
        NOT_SEPARABLE,
        NOT_HELD,
        NOT_SEPARABLE,
    ]


def test_evaluate_claims_order_and_formats():
    rows = [
        BASE,
        row("dpo", 0.1, 1.30, 1.5),
        row("odpo", 0.1, 1.31, 1.55),
        row("simpo", 2.0, 1.2, 1.0, logp_agreement=0.6, logp_agreement_se=0.03),
    ]
    claims = evaluate_claims(rows)
    assert [c["claim"] for c in claims] == ["b", "c", "c", "c", "e"]  # no PPO: (a) skipped; one β: no (d)
    assert all({"verdict", "difference", "se", "detail", "scope"} <= set(c) for c in claims)
    text = format_claims(claims)
    assert "(b) ODPO ≥ DPO at equal KL — default pairs: not separable (d = +0.010 ± 0.014" in text
    md = claims_markdown(claims)
    assert "**held** if d > 2s" in md and "- **(e) SimPO" in md
    assert "No claim applies" in claims_markdown([])
