"""The papers' claims decided from paired differences (per seed, or per held-out prompt with one seed): the t
distribution, every verdict of every claim with the arithmetic in the comments, and the rule's behaviour under
simulated nulls."""

from __future__ import annotations

import math
import random

import pytest

from preftune import metrics as M
from preftune.experiments.claims import (
    HELD,
    NOT_HELD,
    NOT_SEPARABLE,
    PROMPT,
    claim_above_base,
    claim_dpo_vs_ppo,
    claim_kl_grows,
    claim_odpo_vs_dpo,
    claim_online_vs_offline_dpo,
    claim_simpo_agreement,
    claims_markdown,
    compare_at_equal_kl,
    evaluate_claims,
    format_claims,
    frontier,
    interpolation_weights,
    mean_over_range,
    prompt_replicates,
    seed_replicates,
)
from preftune.experiments.report import aggregate_seeds
from preftune.experiments.stats import (
    critical_value,
    paired,
    t_cdf,
    t_quantile,
    t_quantile_series,
    units_to_separate,
    verdict,
)

T2 = 4.302652729749462  # t*(2): the 97.5% quantile of Student's t with 2 degrees of freedom


# ---- the t distribution and the rule ---------------------------------------------------------------------


def test_t_quantiles_against_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert t_quantile(0.975, 29) == pytest.approx(2.045, abs=5e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=5e-4)
    assert t_quantile(0.95, 10) == pytest.approx(1.812, abs=5e-4)
    assert t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-5)
    assert t_quantile(0.025, 2) == pytest.approx(-4.303, abs=5e-4)


def test_t_cdf_against_closed_forms():
    for t in (-3.0, -0.4, 0.0, 0.7, 2.0, 9.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert 1 - t_cdf(2.0, 2) == pytest.approx(0.0918, abs=1e-4)  # the P(T > 2) = 9% at 2 df


def test_paired_and_the_verdict_rule():
    d, se, df = paired([0.1, 0.3, 0.2])  # mean 0.2, sd 0.1, se 0.1/√3
    assert (d, se, df) == (pytest.approx(0.2), pytest.approx(0.1 / math.sqrt(3)), 2)
    assert paired([0.5]) == (0.5, None, None) and paired([]) == (None, None, None)
    assert verdict(0.2, 0.1 / math.sqrt(3), 2) == NOT_SEPARABLE  # 0.2 < 4.303 · 0.0577 = 0.248
    assert verdict(0.25, 0.1 / math.sqrt(3), 2) == HELD
    assert verdict(-0.25, 0.1 / math.sqrt(3), 2) == NOT_HELD
    assert verdict(0.1, 0.05, 29) == NOT_SEPARABLE and verdict(0.103, 0.05, 29) == HELD  # t*(29) = 2.045
    # a missing or zero SE is never "held"
    assert verdict(1e-9, 0.0, 2) == NOT_SEPARABLE and verdict(5.0, None, 2) == NOT_SEPARABLE
    assert verdict(5.0, 0.1, None) == NOT_SEPARABLE and verdict(0.0, 0.0, 2) == NOT_SEPARABLE


def test_the_series_quantile_for_large_df():
    for df in (100, 250, 1000, 10**4):
        assert t_quantile_series(0.975, df) == pytest.approx(t_quantile(0.975, df), abs=1e-9)
    assert critical_value(400) == t_quantile_series(0.975, 400) and critical_value(99) == t_quantile(
        0.975, 99
    )


def test_units_to_separate():
    # d 0.024, sd 0.036: t*(10)·0.036/√11 = 0.0242 > 0.024 but t*(11)·0.036/√12 = 0.0229 < 0.024 -> 12
    assert units_to_separate(0.024, 0.036) == 12 and units_to_separate(-0.024, 0.036) == 12
    for d, sd in ((0.3, 0.2), (0.01, 0.05), (0.5, 0.01)):
        slow = next(n for n in range(2, 10**5) if abs(d) > t_quantile(0.975, n - 1) * sd / math.sqrt(n))
        assert units_to_separate(d, sd) == slow
    assert units_to_separate(0.0, 0.1) is None and units_to_separate(0.1, 0.0) is None


# ---- frontiers at equal KL -------------------------------------------------------------------------------


def row(method, beta, reward, kl, *, pairs=None, **extra):
    return {
        "method": method,
        "beta": beta,
        "reward_mean": reward,
        "reward_se": None,
        "kl_mean": kl,
        "kl_se": None,
        "win_rate": None,
        "logp_agreement": None,
        "n_samples": 10,
        "pairs": pairs,
        **extra,
    }


def seeds(method, beta, rewards, kls, *, run=None, pairs=None, **extra):
    """One model's per-seed rows (seed i: rewards[i], kls[i])."""
    run = run or f"{method}{'-' + pairs if pairs else ''}-beta{beta}"
    return [
        row(method, beta, r, k, pairs=pairs, run=run, seed=s, **extra)
        for s, (r, k) in enumerate(zip(rewards, kls))
    ]


def decide(by_seed):
    """evaluate_claims on seed means, paired per seed."""
    return evaluate_claims(aggregate_seeds(by_seed), seed_replicates(by_seed))


def base_seeds(rewards=(1.10, 1.12, 1.08)):
    return seeds("base", None, list(rewards), [0.0] * len(rewards), run="base")


def test_interpolation_weights_and_mean_over_range():
    assert interpolation_weights([1.0, 3.0], 1.5) == pytest.approx([0.75, 0.25])
    assert interpolation_weights([1.0, 3.0, 4.0], 3.5) == pytest.approx([0.0, 0.5, 0.5])
    assert interpolation_weights([2.0], 7.0) == [1.0]
    assert interpolation_weights([1.0, 3.0], 0.0) == [1.0, 0.0]  # clamped
    assert interpolation_weights([1.0, 2.0, 2.0, 3.0], 2.0) == [0.0, 0.0, 1.0, 0.0]  # a repeated KL: no 0/0
    assert mean_over_range([(3.0, 1.6), (1.0, 1.2)], 2.0, 3.0) == pytest.approx(1.5)  # the value at 2.5
    # flat at 1.1 up to 2.5, then up to 1.1 + 0.2/3 at 3: (0.5 · 1.1 + 0.5 · (1.1 + 1.1333)/2) / 1
    assert mean_over_range([(2.5, 1.1), (4.0, 1.3)], 2.0, 3.0) == pytest.approx(1.1 + 0.2 / 3 / 4)
    assert mean_over_range([(2.5, 1.1), (4.0, 1.3)], 3.25, 3.25) == pytest.approx(1.2)


def test_equal_kl_overlap_interpolates_each_seed_on_its_own_kls():
    # ODPO: (2, 1.4) (3, 1.6) in every seed; DPO: (k_s, 1.1) (4, 1.4) with k_s = 1.0, 1.5, 0.5 (mean 1.0).
    # Overlap of the means: [2, 3]; both lines are straight there, so each mean is the value at 2.5:
    # ODPO 1.5; DPO 1.1 + 0.3·(2.5 − k_s)/(4 − k_s). With the means' KLs every seed's gap would be 0.25, an
    # SE of 0 and no verdict; each seed's own KLs give gaps 0.25, 0.28, 0.2286.
    by_seed = [
        *base_seeds(),
        *seeds("odpo", 0.5, [1.4] * 3, [2.0] * 3),
        *seeds("odpo", 0.1, [1.6] * 3, [3.0] * 3),
        *seeds("dpo", 0.5, [1.1] * 3, [1.0, 1.5, 0.5]),
        *seeds("dpo", 0.1, [1.4] * 3, [4.0] * 3),
    ]
    gaps = [1.5 - (1.1 + 0.3 * (2.5 - k) / (4 - k)) for k in (1.0, 1.5, 0.5)]
    (c,) = [c for c in decide(by_seed) if c["claim"] == "b" and c["statement"] == "ODPO ≥ DPO at equal KL"]
    assert c["basis"] == "overlap" and [v for _, v in c["per_unit"]] == pytest.approx(gaps)
    mean = sum(gaps) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 2)
    assert c["difference"] == pytest.approx(mean) and c["se"] == pytest.approx(sd / math.sqrt(3))
    assert (c["df"], c["critical"], c["unit"], c["n_units"]) == (2, pytest.approx(T2), "seed", 3)
    assert c["verdict"] == HELD  # 0.2529 > 4.303 · 0.0149 = 0.064
    assert c["panel"]["overlap"] == [2.0, 3.0] and "averaged over KL 2.00–3.00" in c["detail"]
    rows, units = aggregate_seeds(by_seed), _units(by_seed)
    swapped = compare_at_equal_kl(frontier(rows, "dpo"), frontier(rows, "odpo"), units)
    assert [v for v in swapped["per_unit"].values()] == pytest.approx([-g for g in gaps])


def _units(by_seed):
    from preftune.experiments.claims import _by_unit

    return _by_unit(seed_replicates(by_seed))


def test_equal_kl_single_point_inside_the_other_frontier():
    # PPO at KLs 2.0, 2.2, 1.8 (mean 2.0) inside DPO's 1 -> 3, read per seed at PPO's own KL: DPO 1.40
    # (seed 0 at 2.0), 1.25 + 0.2·1.2 = 1.49 (seed 1 at 2.2), 1.15 + 0.2·0.8 = 1.31 (seed 2 at 1.8); PPO 1.30,
    # 1.33, 1.26 -> gaps 0.10, 0.16, 0.05: d 0.1033, sd 0.0551, se 0.0318, 0.1033 < 4.303 · 0.0318: not
    # separable (PPO's reward here does not follow its KL, DPO's does)
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.5, [1.20, 1.25, 1.15], [1.0] * 3),
        *seeds("dpo", 0.1, [1.60, 1.65, 1.55], [3.0] * 3),
        *seeds("ppo", 0.05, [1.30, 1.33, 1.26], [2.0, 2.2, 1.8]),
    ]
    (a,) = claim_dpo_vs_ppo(aggregate_seeds(by_seed), _units(by_seed))
    assert a["basis"] == "overlap" and [v for _, v in a["per_unit"]] == pytest.approx([0.10, 0.16, 0.05])
    mean = 0.31 / 3
    assert a["se"] == pytest.approx(
        math.sqrt(((0.1 - mean) ** 2 + (0.16 - mean) ** 2 + (0.05 - mean) ** 2) / 2 / 3)
    )
    assert a["verdict"] == NOT_SEPARABLE and "at each seed's own KL of ppo (mean 2.00)" in a["detail"]


def test_equal_kl_nearest_points_shown_equal():
    # ODPO KLs 2.00, 2.02, 2.00; DPO 2.01, 2.00, 1.99 (means 2.007 and 2.000: single points, no overlap);
    # ΔKL −0.01, +0.02, +0.01: mean 0.0067, se 0.0088, |ΔKL| + t*(2)·se = 0.045 within ±10% of 2.0 (0.20):
    # equal KL, so the rewards compare directly: 1.30 − 1.25, 1.32 − 1.30, 1.29 − 1.27 = 0.05, 0.02, 0.02
    by_seed = [
        *base_seeds(),
        *seeds("odpo", 0.1, [1.30, 1.32, 1.29], [2.00, 2.02, 2.00]),
        *seeds("dpo", 0.1, [1.25, 1.30, 1.27], [2.01, 2.00, 1.99]),
    ]
    (b,) = claim_odpo_vs_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert b["basis"] == "nearest" and [v for _, v in b["per_unit"]] == pytest.approx([0.05, 0.02, 0.02])
    assert b["verdict"] == NOT_SEPARABLE  # 0.03 ± 0.01: 0.03 < 4.303 · 0.01
    assert b["difference"] == pytest.approx(0.03) and b["se"] == pytest.approx(0.01)
    assert "equal within ±0.20 nats (ΔKL +0.01 ± 0.01, t*(2) = 4.30)" in b["detail"]
    # the power line: sd 0.01·√3 = 0.01732; n seeds separate 0.03 once t*(n − 1)·0.01732/√n < 0.03
    assert b["units_to_separate"] == 4  # t*(3)·0.01732/√4 = 0.0276 < 0.03; t*(2)·0.01732/√3 = 0.043
    assert b["power"].startswith("4 seeds would separate d = +0.030")


def test_equal_kl_needs_the_kl_gap_shown_small_not_merely_noisy():
    # ΔKL −0.1, +0.2, −0.4 (mean −0.1, se 0.173): not shown to differ, but its interval (±0.84 at t*(2))
    # reaches far past ±10% of the KL: not equal KL, whatever the rewards
    by_seed = [
        *base_seeds(),
        *seeds("odpo", 0.1, [1.30, 1.32, 1.29], [2.0, 2.2, 1.8]),
        *seeds("dpo", 0.1, [1.25, 1.30, 1.27], [2.1, 2.0, 2.2]),
    ]
    (b,) = claim_odpo_vs_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert b["basis"] == "apart" and b["verdict"] == NOT_SEPARABLE
    assert "ΔKL -0.10 ± 0.17, not within ±0.20 at t*" in b["detail"]
    # a 0.7-nat gap whose seeds scatter (online DPO 2.0, 3.5, 3.5 against DPO's 0.8 and 2.3): once "equal
    # within noise" and then held on its rewards; now apart
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.1, [1.20, 1.20, 1.20], [0.8, 0.8, 0.8]),
        *seeds("dpo", 0.5, [1.30, 1.30, 1.30], [2.3, 2.3, 2.3]),
        *seeds("online_dpo", 0.1, [1.40, 1.36, 1.39], [2.0, 3.5, 3.5]),
    ]
    (f,) = claim_online_vs_offline_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert f["basis"] == "apart" and f["verdict"] == NOT_SEPARABLE


def test_equal_kl_frontiers_apart_are_never_separable():
    # KLs 1 vs 3 (ΔKL −2 ± 0.06): per seed, reward gained over base per nat: ODPO (1.6 − b)/1, DPO (1.5 − b)/3
    base = [1.10, 1.12, 1.08]
    by_seed = [
        *base_seeds(base),
        *seeds("odpo", 0.1, [1.6] * 3, [1.0] * 3),
        *seeds("dpo", 0.1, [1.5] * 3, [3.0, 3.1, 2.9]),
    ]
    (b,) = claim_odpo_vs_dpo(aggregate_seeds(by_seed), _units(by_seed))
    expected = [(1.6 - x) - (1.5 - x) / k for x, k in zip(base, [3.0, 3.1, 2.9])]
    assert b["basis"] == "apart" and [v for _, v in b["per_unit"]] == pytest.approx(expected)
    assert b["difference"] > T2 * b["se"] and b["verdict"] == NOT_SEPARABLE  # beyond t*·se, still undecided
    assert "do not overlap" in b["detail"] and "add points" in b["power"]
    rows = [r for r in aggregate_seeds(by_seed) if r["method"] != "base"]
    no_base = compare_at_equal_kl(frontier(rows, "odpo"), frontier(rows, "dpo"), _units(by_seed))
    assert no_base["per_unit"] == {} and no_base["forced"] == NOT_SEPARABLE


# ---- the claims ------------------------------------------------------------------------------------------


def test_claim_f_online_dpo_vs_offline_dpo_on_the_default_pairs_only():
    # online DPO at KL 2 in each seed inside offline DPO's 1 -> 3 frontier on the default pairs: DPO's reward
    # at KL 2 is the midpoint, 1.40, 1.45, 1.35; online 1.50, 1.52, 1.46 -> gaps 0.10, 0.07, 0.11:
    # d 0.09333, sd 0.02082, se 0.01202, 0.0933 > 4.303 · 0.01202 = 0.0517: held. DPO on a pairs variant
    # (all-n48) far above is not the offline DPO it is compared with.
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.5, [1.20, 1.25, 1.15], [1.0] * 3),
        *seeds("dpo", 0.1, [1.60, 1.65, 1.55], [3.0] * 3),
        *seeds("dpo", 0.1, [3.0] * 3, [2.0] * 3, pairs="all-n48"),
        *seeds("online_dpo", 0.1, [1.50, 1.52, 1.46], [2.0] * 3),
    ]
    (f,) = claim_online_vs_offline_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert (f["claim"], f["statement"], f["scope"]) == (
        "f",
        "online DPO ≥ offline DPO at equal KL",
        "default pairs",
    )
    assert f["basis"] == "overlap" and [v for _, v in f["per_unit"]] == pytest.approx([0.10, 0.07, 0.11])
    assert f["difference"] == pytest.approx(0.28 / 3) and f["verdict"] == HELD
    assert [c["claim"] for c in decide(by_seed)][-1] == "f"  # after (a)-(e)
    # each row above the base, online DPO's included: (c) has a line per model
    assert "online_dpo β=0.1" in [c["scope"] for c in decide(by_seed) if c["claim"] == "c"]
    without = [r for r in by_seed if r["method"] != "online_dpo"]
    assert claim_online_vs_offline_dpo(aggregate_seeds(without), _units(without)) == []
    no_offline = [r for r in by_seed if r["method"] != "dpo"]
    assert claim_online_vs_offline_dpo(aggregate_seeds(no_offline), _units(no_offline)) == []


def test_a_one_point_frontier_is_compared_at_each_seeds_own_kl():
    # offline DPO on one line in every seed, reward 1.0 + 0.2·KL (KL 1 and 2); online DPO at KLs 1.2, 1.9, 1.4
    # (mean 1.5), rewards 0.01, 0.02, 0.015 above that line at its own KL: gaps 0.01, 0.02, 0.015, d 0.015,
    # se 0.0029, held. Read at the mean KL 1.5 (1.30) in every seed instead, the gaps would be −0.05, +0.10,
    # −0.005: the seeds' KL spread, not the methods' difference.
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.5, [1.2] * 3, [1.0] * 3),
        *seeds("dpo", 0.1, [1.4] * 3, [2.0] * 3),
        *seeds("online_dpo", 0.1, [1.25, 1.40, 1.295], [1.2, 1.9, 1.4]),
    ]
    (f,) = claim_online_vs_offline_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert f["basis"] == "overlap" and [v for _, v in f["per_unit"]] == pytest.approx([0.01, 0.02, 0.015])
    assert f["verdict"] == HELD and "at each seed's own KL of online_dpo (mean 1.50)" in f["detail"]


def test_claim_b_per_pairs_setting_and_with_fewer_pairs():
    small = {"pairs_mode": "all", "n_pairs": 48}
    large = {"pairs_mode": "all", "n_pairs": 300}
    by_seed = [
        *base_seeds(),
        # 300 pairs: KLs equal per seed, gaps 0.02, 0.03, 0.01
        *seeds("dpo", 0.1, [1.60, 1.62, 1.58], [4.0, 4.2, 3.8], pairs="all", **large),
        *seeds("odpo", 0.1, [1.62, 1.65, 1.59], [4.0, 4.2, 3.8], pairs="all", **large),
        # 48 pairs: gaps 0.15, 0.14, 0.16
        *seeds("dpo", 0.1, [1.20, 1.22, 1.18], [2.0, 2.1, 1.9], pairs="all-n48", **small),
        *seeds("odpo", 0.1, [1.35, 1.36, 1.34], [2.0, 2.1, 1.9], pairs="all-n48", **small),
        *seeds("odpo", 0.1, [1.35, 1.36, 1.34], [2.0, 2.1, 1.9], pairs="bvw-only-odpo"),  # no DPO there
    ]
    all_pairs, few, fewer_gap = claim_odpo_vs_dpo(aggregate_seeds(by_seed), _units(by_seed))
    assert all_pairs["scope"] == "pairs all (300 pairs)" and all_pairs["basis"] == "overlap"
    assert [v for _, v in all_pairs["per_unit"]] == pytest.approx([0.02, 0.03, 0.01])
    assert few["scope"] == "pairs all-n48 (48 pairs)" and few["verdict"] == HELD
    # per seed: 0.15 − 0.02, 0.14 − 0.03, 0.16 − 0.01 = 0.13, 0.11, 0.15: d 0.13, se 0.02/√3
    assert fewer_gap["statement"] == "ODPO's gain over DPO is larger with fewer pairs"
    assert [v for _, v in fewer_gap["per_unit"]] == pytest.approx([0.13, 0.11, 0.15])
    assert fewer_gap["se"] == pytest.approx(0.02 / math.sqrt(3)) and fewer_gap["verdict"] == HELD
    assert fewer_gap["scope"] == "all pairs, 48 vs 300"


def test_claim_c_pairs_within_a_seed():
    # the seeds move base and model together (common random numbers): rewards 1.10/1.30/0.90 for base and
    # +0.05, +0.06, +0.04 above it for DPO. Paired: d 0.05 ± 0.00577, held. Unpaired, the seed means' SEs
    # (0.115 each) would combine to 0.16 and bury it.
    by_seed = [
        *base_seeds([1.10, 1.30, 0.90]),
        *seeds("dpo", 0.1, [1.15, 1.36, 0.94], [1.5] * 3),
        *seeds("ipo", 0.1, [1.12, 1.29, 0.93], [1.0] * 3),  # +0.02, −0.01, +0.03: not separable
        *seeds("simpo", 2.0, [1.00, 1.21, 0.79], [0.5] * 3),  # −0.10, −0.09, −0.11: not held
    ]
    dpo, ipo, simpo = claim_above_base(aggregate_seeds(by_seed), _units(by_seed))
    assert (dpo["scope"], dpo["verdict"]) == ("dpo β=0.1", HELD)
    assert dpo["difference"] == pytest.approx(0.05) and dpo["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert aggregate_seeds(by_seed)[1]["reward_se"] > 0.1  # the seed means' own SE
    assert (ipo["verdict"], simpo["verdict"]) == (NOT_SEPARABLE, NOT_HELD)
    assert ipo["units_to_separate"] is not None and ipo["power"].startswith(
        f"{ipo['units_to_separate']} seeds"
    )
    assert dpo["power"] is None and "at KL 1.50" in dpo["detail"]


def test_claim_c_says_which_seed_had_no_reward_and_pairs_over_the_rest():
    # seed 1's DPO evaluation has no reward: the seed mean is None, and the claim is still there, paired over
    # seeds 0 and 2 (+0.05, +0.04: d 0.045, se 0.005, df 1, t* 12.71: not separable), saying so
    by_seed = [*base_seeds([1.10, 1.30, 0.90]), *seeds("dpo", 0.1, [1.15, None, 0.94], [1.5] * 3)]
    (dpo,) = claim_above_base(aggregate_seeds(by_seed), _units(by_seed))
    assert (dpo["n_units"], dpo["df"], dpo["verdict"]) == (2, 1, NOT_SEPARABLE)
    assert dpo["difference"] == pytest.approx(0.045) and dpo["se"] == pytest.approx(0.005)
    assert "reward - vs base" in dpo["detail"]
    assert "no reward (model's or base's) in seeds 1 (paired over the rest)" in dpo["detail"]
    # the base model's seed 2 missing as well: its seed mean is None, the claim stands on seed 0 alone
    by_seed[2]["reward_mean"] = None
    (dpo,) = claim_above_base(aggregate_seeds(by_seed), _units(by_seed))
    assert (dpo["n_units"], dpo["difference"], dpo["verdict"]) == (1, pytest.approx(0.05), NOT_SEPARABLE)
    assert "vs base -" in dpo["detail"] and "in seeds 1, 2 (paired over the rest)" in dpo["detail"]
    # no seed left: said so, not "paired over the rest"
    none = by_seed[:3] + seeds("dpo", 0.1, [None] * 3, [1.5] * 3)
    (dpo,) = claim_above_base(aggregate_seeds(none), _units(none))
    assert dpo["n_units"] == 0 and "(no seeds to pair)" in dpo["detail"]


def test_claim_d_kl_grows_as_beta_shrinks():
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.5, [1.3] * 3, [1.1, 1.2, 1.3]),
        *seeds("dpo", 0.05, [1.4] * 3, [2.9, 3.0, 3.0]),
        *seeds("dpo", 0.1, [1.3] * 3, [2.3, 2.3, 2.3]),  # β 0.5 -> 0.1 -> 0.05: 1.2, 2.3, 2.97: monotone
        *seeds("ipo", 0.5, [1.2] * 3, [1.5, 1.6, 1.4]),
        *seeds("ipo", 0.1, [1.2] * 3, [1.0, 1.1, 0.9]),  # −0.5 in every seed: se 0, not separable
        *seeds("simpo", 2.0, [1.2] * 3, [1.0] * 3),  # one β: no claim
    ]
    dpo, ipo = claim_kl_grows(aggregate_seeds(by_seed), _units(by_seed))
    # per seed 2.9 − 1.1, 3.0 − 1.2, 3.0 − 1.3 = 1.8, 1.8, 1.7
    assert [v for _, v in dpo["per_unit"]] == pytest.approx([1.8, 1.8, 1.7])
    assert (dpo["scope"], dpo["verdict"], dpo["monotone"]) == ("dpo", HELD, True)
    assert "β=0.5: 1.20, β=0.1: 2.30, β=0.05: 2.97" in dpo["detail"]
    assert ipo["difference"] == pytest.approx(-0.5) and ipo["se"] == pytest.approx(0.0, abs=1e-12)
    assert (ipo["verdict"], ipo["monotone"]) == (NOT_SEPARABLE, False)  # a zero SE is never decided


def test_claim_e_simpo_agreement_per_seed_and_over_pairs():
    by_seed = [
        *seeds("simpo", 2.0, [1.2] * 3, [1.0] * 3, logp_agreement=None),
        *seeds("simpo", 5.0, [1.2] * 3, [1.0] * 3),
    ]
    for r, a in zip(by_seed[:3], (0.60, 0.62, 0.61)):
        r["logp_agreement"] = a
    for r, a in zip(by_seed[3:], (0.45, 0.60, 0.52)):
        r["logp_agreement"] = a
    held, unsure = claim_simpo_agreement(aggregate_seeds(by_seed), _units(by_seed))
    assert held["verdict"] == HELD and held["difference"] == pytest.approx(0.11)  # 0.11 ± 0.0058
    assert unsure["verdict"] == NOT_SEPARABLE and unsure["unit"] == "seed"
    # one seed: the share over its held-out pairs, binomial SE, df = pairs − 1
    one = [
        row("simpo", 2.0, 1.2, 1.0, logp_agreement=0.60, logp_agreement_se=0.03, heldout_pairs=64),
        row("simpo", 10.0, 1.2, 1.0, logp_agreement=0.40, logp_agreement_se=0.03, heldout_pairs=64),
        row("simpo", 20.0, 1.2, 1.0, logp_agreement=0.90),  # no SE: not decided
    ]
    verdicts = [(c["verdict"], c["df"], c["unit"]) for c in claim_simpo_agreement(one, {}, PROMPT)]
    assert verdicts == [(HELD, 63, "pair"), (NOT_HELD, 63, "pair"), (NOT_SEPARABLE, None, "pair")]


# ---- one seed: pairs by prompt and slot ------------------------------------------------------------------


def test_one_seed_pairs_by_prompt_with_the_clustered_se():
    rng = random.Random(3)
    m, prompts = 3, 40
    base = [rng.gauss(1.1, 0.3) for _ in range(m * prompts)]
    dpo = [b + 0.04 + rng.gauss(0, 0.05) for b in base]  # the same prompts and slots: paired
    kl = [abs(rng.gauss(1.5, 0.5)) for _ in base]
    rows = [
        row("base", None, sum(base) / len(base), 0.0, run="base"),
        row("dpo", 0.1, sum(dpo) / len(dpo), 1.5, run="dpo"),
    ]
    per_sample = {"base": {"rewards": base, "kl": [0.0] * len(base)}, "dpo": {"rewards": dpo, "kl": kl}}
    reps = prompt_replicates(rows, per_sample, m)
    assert len(reps) == 2 * prompts and reps[0]["reward_mean"] == pytest.approx(sum(base[:3]) / 3)
    (c,) = claim_above_base(
        rows, __import__("preftune.experiments.claims", fromlist=["_by_unit"])._by_unit(reps), PROMPT
    )
    # the per-sample paired differences' mean and prompt-clustered SE (metrics.mean_and_se)
    diffs = [a - b for a, b in zip(dpo, base)]
    mean, se = M.mean_and_se(diffs, [i // m for i in range(len(diffs))])
    assert c["difference"] == pytest.approx(mean) and c["se"] == pytest.approx(se)
    assert (c["df"], c["unit"], c["n_units"], c["verdict"]) == (prompts - 1, PROMPT, prompts, HELD)
    with pytest.raises(ValueError, match="whole prompts"):
        prompt_replicates(rows, {"base": {"rewards": base[:-1]}}, m)


# ---- properties ------------------------------------------------------------------------------------------


def test_the_same_model_twice_gives_d_0_se_0_not_separable():
    rewards, kls = [1.31, 1.22, 1.40], [1.2, 0.9, 1.5]
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.1, rewards, kls),
        *seeds("ppo", 0.1, rewards, kls),  # the same numbers: the same model evaluated twice
        *seeds("ipo", 0.1, [1.10, 1.12, 1.08], [0.0] * 3),  # the base model's own numbers
    ]
    claims = decide(by_seed)
    (a,) = [c for c in claims if c["claim"] == "a"]
    (ipo,) = [c for c in claims if c["scope"] == "ipo β=0.1"]
    for c in (a, ipo):
        assert c["difference"] == pytest.approx(0.0, abs=1e-12) and c["se"] == pytest.approx(0.0, abs=1e-12)
        assert c["verdict"] == NOT_SEPARABLE and c["units_to_separate"] is None
    # one seed: the same per-sample rewards under two names
    rows = [row("dpo", 0.1, 1.3, 1.0, run="dpo"), row("ppo", 0.1, 1.3, 1.0, run="ppo")]
    same = {"rewards": [1.0, 1.5, 1.2, 1.4], "kl": [1.0, 0.8, 1.2, 1.0]}
    (one,) = evaluate_claims(rows, prompt_replicates(rows, {"dpo": same, "ppo": same}, 2), PROMPT)
    assert (one["difference"], one["se"], one["verdict"]) == (0.0, 0.0, NOT_SEPARABLE)


def test_without_two_units_nothing_is_decided():
    rows = [row("base", None, 1.0, 0.0, run="base"), row("dpo", 0.1, 2.0, 1.0, run="dpo")]
    assert [c["verdict"] for c in evaluate_claims(rows, [])] == [NOT_SEPARABLE]
    one_seed = [{**r, "seed": 0} for r in rows]
    (c,) = evaluate_claims(rows, seed_replicates(one_seed))
    assert (c["difference"], c["se"], c["verdict"]) == (1.0, None, NOT_SEPARABLE)
    assert "fewer than two" in c["power"]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_false_held_rate_under_the_null_is_at_most_nominal(rho):
    """3 seeds, every model's true reward the base model's at every KL (flat frontiers), the models of a seed
    correlated by ``rho`` (common random numbers): a one-sided 97.5% rule may call "held" 2.5% of the time.
    The rule d > 2·se on SEs over seeds (t with 2 df) calls it ~9%; combining the two models' SEs as if
    independent, 5.7% at ρ = 0 and 0.5% at ρ = 0.9."""
    rng = random.Random(1234 + int(10 * rho))
    n_sim, held = 2000, {"a": 0, "c": 0}
    for _ in range(n_sim):
        by_seed = []
        for s in range(3):
            common = rng.gauss(0, math.sqrt(rho))
            r = [1.2 + common + rng.gauss(0, math.sqrt(1 - rho)) for _ in range(4)]
            by_seed += [
                row("base", None, r[0], 0.0, run="base", seed=s),
                row("dpo", 0.5, r[1], 1.0 + rng.gauss(0, 0.1), run="dpo-0.5", seed=s),
                row("dpo", 0.1, r[2], 3.0 + rng.gauss(0, 0.1), run="dpo-0.1", seed=s),
                row("ppo", 0.1, r[3], 2.0 + rng.gauss(0, 0.1), run="ppo-0.1", seed=s),
            ]
        runs: dict = {}
        for r in by_seed:  # the seed means (aggregate_seeds' means, without its SEs: faster)
            runs.setdefault(r["run"], []).append(r)
        means = [
            {
                **group[0],
                "reward_mean": sum(r["reward_mean"] for r in group) / 3,
                "kl_mean": sum(r["kl_mean"] for r in group) / 3,
            }
            for group in runs.values()
        ]
        for c in evaluate_claims(means, seed_replicates(by_seed)):
            if c["claim"] == "a" or (c["claim"] == "c" and c["scope"] == "ppo β=0.1"):
                held[c["claim"]] += c["verdict"] == HELD
    bound = 0.025 + 3 * math.sqrt(0.025 * 0.975 / n_sim)  # nominal + 3 Monte-Carlo SEs = 0.0355
    assert held["a"] / n_sim <= bound and held["c"] / n_sim <= bound, held
    assert held["a"] + held["c"] > 0  # the rule is not vacuous (expected ~100 of 4000)


# ---- text ------------------------------------------------------------------------------------------------


def test_evaluate_claims_order_records_and_text():
    by_seed = [
        *base_seeds(),
        *seeds("dpo", 0.1, [1.30, 1.31, 1.29], [1.50, 1.52, 1.49]),
        *seeds("odpo", 0.1, [1.31, 1.30, 1.33], [1.52, 1.53, 1.51]),  # KLs equal within ±10%
        *seeds("simpo", 2.0, [1.2, 1.21, 1.19], [1.0] * 3, logp_agreement=0.6),
    ]
    claims = decide(by_seed)
    assert [c["claim"] for c in claims] == ["b", "c", "c", "c", "e"]  # no PPO: (a) skipped; one β: no (d)
    keys = {"verdict", "difference", "se", "df", "critical", "unit", "n_units", "per_unit", "power", "detail"}
    assert all(keys <= set(c) for c in claims)
    assert claims[0]["verdict"] == NOT_SEPARABLE and claims[0]["power"]
    text = format_claims(claims)
    assert (
        "(b) ODPO ≥ DPO at equal KL — default pairs: not separable (d = +0.013 ± 0.015, t*(2) = 4.30" in text
    )
    assert "\n    power: " in text
    md = claims_markdown(claims, {0: "claims/00-b.png", 1: "claims/01-c-all.png", 2: "claims/01-c-all.png"})
    assert "**held** if d > t*·se" in md and "- **(e) SimPO" in md and "\n  - power: " in md
    assert md.count("claims/01-c-all.png") == 1  # a shared panel once, after its last claim
    assert md.index("claims/01-c-all.png") > md.index("dpo β=0.1") and md.index("(b) ODPO") < md.index(
        "00-b.png"
    )
    assert "No claim applies" in claims_markdown([])
    assert critical_value(2) == pytest.approx(T2)
    with pytest.raises(ValueError, match="unit"):
        evaluate_claims([], [], "prompts")
