"""The papers' claims, decided from the experiment's result rows (pure functions; no model, no files).

Every claim is a difference d with a standard error s — independent estimates combine as
s = √(s₁² + s₂²) — and one verdict, the same rule for all:

    held           d > 2s     (the claimed direction, beyond two standard errors)
    not held       d < −2s
    not separable  otherwise

The claims, each checked only when its methods are among the rows:

(a) DPO ≥ PPO at equal KL (DPO paper §6.1, Fig. 2: DPO's reward-vs-KL frontier dominates PPO's).
(b) ODPO ≥ DPO at equal KL (ODPO paper §4), on the experiment's pairs and on each pairs variant both ran
    on; and whether ODPO's gain is larger with fewer pairs (same pair mode, fewest vs most pairs).
(c) Every trained model's reward is above the base model's, at the KL it reached (printed beside it).
(d) KL grows as β shrinks: per method (and pairs setting) with two or more β, KL at the smallest β minus KL
    at the largest, and whether the means are monotone, with the KLs listed.
(e) SimPO's average-log-likelihood agreement with the preference is above 0.5 (SimPO paper §2.2).

"At equal KL" (a, b) compares two frontiers — a method's rows on one pairs setting, sorted by KL:

1. where their KL ranges overlap, the mean over that range of the reward gap, each frontier interpolated
   linearly in KL (a single point inside the other's range: the gap at that KL). The gap is a fixed linear
   combination of the points' rewards, so its SE follows from theirs; the KLs' own noise is not propagated;
2. where they do not overlap but the nearest two points' KLs are equal within noise (|ΔKL| ≤ 2 SE), the
   reward gap of those two points;
3. otherwise the reward gained over the base model per nat of KL at those two points, for information, and
   always "not separable": rewards at different KLs do not say which frontier is higher.

Rows are result rows (:mod:`.report`): seed means with SEs over seeds, or one seed's rows with
prompt-clustered SEs. The keys read beyond the required ones: ``pairs`` (a pairs variant, None for the
experiment's pairs), ``pairs_mode``, ``n_pairs`` and ``logp_agreement_se``; all may be absent.
"""

from __future__ import annotations

import math

HELD, NOT_HELD, NOT_SEPARABLE = "held", "not held", "not separable"
GRID = 101  # KL points over an overlap range (case 1)

__all__ = [
    "HELD",
    "NOT_HELD",
    "NOT_SEPARABLE",
    "claims_markdown",
    "compare_at_equal_kl",
    "evaluate_claims",
    "format_claims",
    "interpolation_weights",
    "verdict",
]


def verdict(difference: float, se: float) -> str:
    """``held`` if d > 2·se, ``not held`` if d < −2·se, else ``not separable`` (d = 0, se = 0 included)."""
    if difference > 2 * se:
        return HELD
    if difference < -2 * se:
        return NOT_HELD
    return NOT_SEPARABLE


def combined_se(*ses: float | None) -> float:
    """SE of a sum or difference of independent estimates: √(Σ sᵢ²); a missing SE counts as 0."""
    return math.sqrt(sum((s or 0.0) ** 2 for s in ses))


def _claim(claim: str, statement: str, scope: str, d, se, detail: str, decided: str | None = None) -> dict:
    """One claims.json record; the verdict follows the rule unless ``decided`` overrides it (case 3)."""
    if decided is None:
        decided = NOT_SEPARABLE if d is None or se is None else verdict(d, se)
    return {
        "claim": claim,
        "statement": statement,
        "scope": scope,
        "verdict": decided,
        "difference": d,
        "se": se,
        "detail": detail,
    }


# ---- frontiers -------------------------------------------------------------------------------------------


def series_label(method: str, pairs: str | None) -> str:
    """``dpo``, or ``dpo [all-n48]`` on a pairs variant."""
    return method if pairs is None else f"{method} [{pairs}]"


def _point(row: dict) -> str:
    return f"{series_label(row['method'], row.get('pairs'))} β={row['beta']:g}"


def frontier(rows: list[dict], method: str, pairs: str | None = None) -> list[dict]:
    """A method's rows on one pairs setting with a reward and a KL, sorted by KL."""
    points = [
        r
        for r in rows
        if r["method"] == method
        and r.get("pairs") == pairs
        and r.get("reward_mean") is not None
        and r.get("kl_mean") is not None
    ]
    return sorted(points, key=lambda r: r["kl_mean"])


def interpolation_weights(xs: list[float], x: float) -> list[float]:
    """Weights w with Σ wᵢ yᵢ = the linear interpolation at ``x`` of the points (xs, y), xs ascending;
    ``x`` is clamped to [xs[0], xs[-1]].
    Example: xs [1, 3], x 1.5 -> [0.75, 0.25]."""
    n = len(xs)
    weights = [0.0] * n
    if n == 1 or x <= xs[0]:
        weights[0] = 1.0
        return weights
    if x >= xs[-1]:
        weights[-1] = 1.0
        return weights
    k = max(i for i in range(n - 1) if xs[i] <= x)  # the last point at or left of x: xs[k + 1] > x
    w = (x - xs[k]) / (xs[k + 1] - xs[k])
    weights[k], weights[k + 1] = 1.0 - w, w
    return weights


def _mean_weights(xs: list[float], lo: float, hi: float) -> list[float]:
    """Weights of the mean of the interpolated curve over [lo, hi] (one point when lo == hi)."""
    grid = [lo] if lo == hi else [lo + (hi - lo) * i / (GRID - 1) for i in range(GRID)]
    per_point = [interpolation_weights(xs, x) for x in grid]
    return [sum(w[i] for w in per_point) / len(grid) for i in range(len(xs))]


def _weighted(weights: list[float], rows: list[dict], key: str) -> float:
    return sum(w * r[key] for w, r in zip(weights, rows))


def _gain_per_nat(row: dict, base: dict | None) -> tuple[float, float] | None:
    """(reward − base reward) / KL and its delta-method SE; None without a base row or a positive KL."""
    kl = row["kl_mean"]
    if base is None or kl <= 0:
        return None
    gain = row["reward_mean"] - base["reward_mean"]
    var = (combined_se(row.get("reward_se"), base.get("reward_se")) / kl) ** 2
    var += (gain * (row.get("kl_se") or 0.0) / kl**2) ** 2
    return gain / kl, math.sqrt(var)


def compare_at_equal_kl(a: list[dict], b: list[dict], base: dict | None = None) -> dict:
    """Reward of frontier ``a`` minus frontier ``b`` at equal KL (the three cases of the module docstring).

    ``a`` and ``b``: rows sorted by KL (:func:`frontier`). Returns ``{"difference", "se", "verdict",
    "basis", "detail"}``; ``basis`` is ``overlap``, ``nearest`` or ``apart`` (case 3, verdict always
    not separable, difference = gain per nat of ``a`` minus ``b``, or None).
    """
    xa, xb = [r["kl_mean"] for r in a], [r["kl_mean"] for r in b]
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    name_a, name_b = (
        series_label(a[0]["method"], a[0].get("pairs")),
        series_label(b[0]["method"], b[0].get("pairs")),
    )
    if lo <= hi:
        wa, wb = _mean_weights(xa, lo, hi), _mean_weights(xb, lo, hi)
        d = _weighted(wa, a, "reward_mean") - _weighted(wb, b, "reward_mean")
        se = combined_se(*(w * (r.get("reward_se") or 0.0) for w, r in zip(wa + wb, a + b)))
        where = f"at KL {lo:.2f}" if lo == hi else f"averaged over KL {lo:.2f}–{hi:.2f}"
        detail = f"reward {name_a} − {name_b} {where}, each frontier interpolated linearly in KL"
        return {"difference": d, "se": se, "verdict": verdict(d, se), "basis": "overlap", "detail": detail}
    i, j = min(
        ((i, j) for i in range(len(a)) for j in range(len(b))), key=lambda ij: abs(xa[ij[0]] - xb[ij[1]])
    )
    ra, rb = a[i], b[j]
    dk, sk = xa[i] - xb[j], combined_se(ra.get("kl_se"), rb.get("kl_se"))
    kls = f"KL {_point(ra)} {xa[i]:.2f} vs {_point(rb)} {xb[j]:.2f}"
    if abs(dk) <= 2 * sk:
        d, se = ra["reward_mean"] - rb["reward_mean"], combined_se(ra.get("reward_se"), rb.get("reward_se"))
        detail = f"KL ranges do not overlap but {kls} are equal within noise (ΔKL {dk:+.2f} ± {sk:.2f}): reward gap"
        return {"difference": d, "se": se, "verdict": verdict(d, se), "basis": "nearest", "detail": detail}
    ga, gb = _gain_per_nat(ra, base), _gain_per_nat(rb, base)
    detail = f"KL ranges do not overlap ({kls}, ΔKL {dk:+.2f} ± {sk:.2f}): rewards at different KLs do not say which frontier is higher"
    if ga is None or gb is None:
        return {"difference": None, "se": None, "verdict": NOT_SEPARABLE, "basis": "apart", "detail": detail}
    detail += (
        f"; reward gain over base per nat of KL {ga[0]:.3f} ± {ga[1]:.3f} vs {gb[0]:.3f} ± {gb[1]:.3f}"
        " (difference shown)"
    )
    d, se = ga[0] - gb[0], combined_se(ga[1], gb[1])
    return {"difference": d, "se": se, "verdict": NOT_SEPARABLE, "basis": "apart", "detail": detail}


# ---- the claims ------------------------------------------------------------------------------------------


def _base(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == "base" and r.get("reward_mean") is not None), None)


def _frontier_claim(claim: str, statement: str, scope: str, a: list[dict], b: list[dict], base) -> dict:
    c = compare_at_equal_kl(a, b, base)
    return _claim(claim, statement, scope, c["difference"], c["se"], c["detail"], c["verdict"]) | {
        "basis": c["basis"]
    }


def claim_dpo_vs_ppo(rows: list[dict]) -> list[dict]:
    """(a) DPO ≥ PPO at equal KL, on the experiment's pairs (PPO trains from prompts)."""
    dpo, ppo = frontier(rows, "dpo"), frontier(rows, "ppo")
    if not dpo or not ppo:
        return []
    return [_frontier_claim("a", "DPO ≥ PPO at equal KL", "default pairs", dpo, ppo, _base(rows))]


def _pairs_scope(rows: list[dict], pairs: str | None) -> str:
    n = next((r.get("n_pairs") for r in rows if r.get("pairs") == pairs and r.get("n_pairs")), None)
    name = "default pairs" if pairs is None else f"pairs {pairs}"
    return name if n is None else f"{name} ({n} pairs)"


def claim_odpo_vs_dpo(rows: list[dict]) -> list[dict]:
    """(b) ODPO ≥ DPO at equal KL per pairs setting both ran on, then whether the gain is larger with fewer
    pairs: per pair mode with two or more pair counts, the gain on the fewest minus the gain on the most
    (only gains measured at equal KL, cases 1 and 2)."""
    settings = {r.get("pairs") for r in rows if r["method"] == "odpo"} & {
        r.get("pairs") for r in rows if r["method"] == "dpo"
    }
    base, claims, gains = _base(rows), [], {}
    for pairs in sorted(settings, key=lambda p: (p is not None, p or "")):
        odpo, dpo = frontier(rows, "odpo", pairs), frontier(rows, "dpo", pairs)
        if not odpo or not dpo:
            continue
        c = _frontier_claim("b", "ODPO ≥ DPO at equal KL", _pairs_scope(rows, pairs), odpo, dpo, base)
        claims.append(c)
        mode, n = dpo[0].get("pairs_mode"), dpo[0].get("n_pairs")
        if c["basis"] != "apart" and mode is not None and n is not None:
            gains.setdefault(mode, []).append((n, c))
    for mode, found in gains.items():
        few, many = min(found, key=lambda g: g[0]), max(found, key=lambda g: g[0])
        if few[0] == many[0]:
            continue
        d, se = few[1]["difference"] - many[1]["difference"], combined_se(few[1]["se"], many[1]["se"])
        detail = (
            f"ODPO − DPO gain with {few[0]} pairs {few[1]['difference']:+.3f} ± {few[1]['se']:.3f} minus with "
            f"{many[0]} pairs {many[1]['difference']:+.3f} ± {many[1]['se']:.3f}"
        )
        scope = f"{mode} pairs, {few[0]} vs {many[0]}"
        claims.append(_claim("b", "ODPO's gain over DPO is larger with fewer pairs", scope, d, se, detail))
    return claims


def claim_above_base(rows: list[dict]) -> list[dict]:
    """(c) every trained model's reward above the base model's, with its KL beside it."""
    base = _base(rows)
    if base is None:
        return []
    claims = []
    for r in rows:
        if r["method"] == "base" or r.get("reward_mean") is None:
            continue
        d = r["reward_mean"] - base["reward_mean"]
        se = combined_se(r.get("reward_se"), base.get("reward_se"))
        kl = "-" if r.get("kl_mean") is None else f"{r['kl_mean']:.2f} ± {r.get('kl_se') or 0.0:.2f}"
        detail = f"reward {r['reward_mean']:.3f} vs base {base['reward_mean']:.3f}, at KL {kl} nats"
        claims.append(_claim("c", "above the base model at bounded KL", _point(r), d, se, detail))
    return claims


def claim_kl_grows(rows: list[dict]) -> list[dict]:
    """(d) per method and pairs setting with two or more β: KL at the smallest β minus KL at the largest."""
    groups: dict[tuple, dict[float, dict]] = {}
    for r in rows:
        if r["method"] != "base" and r.get("beta") is not None and r.get("kl_mean") is not None:
            groups.setdefault((r["method"], r.get("pairs")), {}).setdefault(r["beta"], r)
    claims = []
    for (method, pairs), by_beta in groups.items():
        if len(by_beta) < 2:
            continue
        points = [by_beta[b] for b in sorted(by_beta, reverse=True)]  # largest β first
        kls = [p["kl_mean"] for p in points]
        monotone = all(x <= y for x, y in zip(kls, kls[1:]))
        d = kls[-1] - kls[0]
        se = combined_se(points[-1].get("kl_se"), points[0].get("kl_se"))
        listed = ", ".join(f"β={p['beta']:g}: {p['kl_mean']:.2f}" for p in points)
        detail = (
            f"KL at smallest β minus at largest; KLs {listed} ({'monotone' if monotone else 'not monotone'})"
        )
        scope = series_label(method, pairs)
        claims.append(_claim("d", "KL grows as β shrinks", scope, d, se, detail) | {"monotone": monotone})
    return claims


def claim_simpo_agreement(rows: list[dict]) -> list[dict]:
    """(e) SimPO's average-log-likelihood agreement with the preference above 0.5."""
    claims = []
    for r in rows:
        if r["method"] != "simpo" or r.get("logp_agreement") is None:
            continue
        se = r.get("logp_agreement_se")
        detail = f"avg-logp agreement {r['logp_agreement']:.3f} on held-out pairs, minus 0.5"
        if se is None:
            detail += " (no standard error)"
        d = r["logp_agreement"] - 0.5
        claims.append(
            _claim("e", "SimPO's likelihood–preference agreement above 0.5", _point(r), d, se, detail)
        )
    return claims


CLAIMS = (claim_dpo_vs_ppo, claim_odpo_vs_dpo, claim_above_base, claim_kl_grows, claim_simpo_agreement)


def evaluate_claims(rows: list[dict]) -> list[dict]:
    """Every claim whose methods are present, in the order (a)–(e): claims.json's records
    ``{"claim", "statement", "scope", "verdict", "difference", "se", "detail", ...}``."""
    return [c for check in CLAIMS for c in check(rows)]


def _numbers(c: dict) -> str:
    if c["difference"] is None:
        return "no difference computable"
    se = "-" if c["se"] is None else f"{c['se']:.3f}"
    return f"d = {c['difference']:+.3f} ± {se}"


def format_claims(claims: list[dict]) -> str:
    """One line per claim for the terminal."""
    return "\n".join(
        f"({c['claim']}) {c['statement']} — {c['scope']}: {c['verdict']} ({_numbers(c)}; {c['detail']})"
        for c in claims
    )


def claims_markdown(claims: list[dict]) -> str:
    """report.md's Claims section: the rule, then one bullet per claim."""
    lines = [
        "Each claim is a difference d ± its standard error s (independent SEs combine as √(s₁² + s₂²)):",
        "**held** if d > 2s in the claimed direction, **not held** if d < −2s, else **not separable**.",
        "At equal KL: the mean reward gap over the KL range both frontiers cover (linear interpolation), or",
        "the nearest points when their KLs are equal within noise; frontiers apart in KL are not separable.",
        "",
    ]
    if not claims:
        return "\n".join(lines + ["No claim applies to the methods of this experiment."])
    lines += [
        f"- **({c['claim']}) {c['statement']}** — {c['scope']}: **{c['verdict']}**, {_numbers(c)} ({c['detail']})"
        for c in claims
    ]
    return "\n".join(lines)
