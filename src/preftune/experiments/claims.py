"""The papers' claims, decided from paired differences (pure functions; no model, no files).

Every model of one seed is evaluated on the same held-out prompts with the same random numbers (common random
numbers: at small KL a trained model reproduces the base model's completions), so two models' numbers are not
independent, and their SEs must not be combined as √(s₁² + s₂²). Each claim is therefore decided from one
difference per *unit* of replication (:mod:`.stats`):

- with several seeds, per seed: d_s = (claim's quantity for A in seed s) − (for B in seed s), each seed's own
  frontier interpolated at equal KL; the unit rows are the per-seed result rows;
- with one seed, per held-out prompt: the difference of the two models' mean over that prompt's samples
  (samples are aligned by prompt and slot). Its SE over prompts is the prompt-clustered SE of the per-sample
  paired differences (equal samples per prompt); the frontier's interpolation weights are the seed's. That
  SE holds the evaluation's noise only, not the training's: a verdict is about these trained models.

d = mean(d_u), se = sd(d_u)/√n, df = n − 1, and with t* the 97.5% quantile of Student's t with df:

    held           d > t*·se     (the claimed direction; a false "held" 2.5% of the time under the null)
    not held       d < −t*·se
    not separable  otherwise, and whenever se is missing or 0

Each not-separable claim carries a *power line*: how many units (seeds, or held-out prompts) would separate the
observed difference at the observed per-unit spread (:func:`.stats.units_to_separate`).

The claims, each checked only when its methods are among the rows:

(a) DPO ≥ PPO at equal KL (DPO paper §6.1, Fig. 2: DPO's reward-vs-KL frontier dominates PPO's).
(b) ODPO ≥ DPO at equal KL (ODPO paper §4), on the experiment's pairs and on each pairs variant both ran
    on; and whether ODPO's gain is larger with fewer pairs (same pair mode, fewest vs most pairs: per unit,
    the gain on the fewest minus the gain on the most).
(c) Every trained model's reward is above the base model's, at the KL it reached (printed beside it).
(d) KL grows as β shrinks: per method (and pairs setting) with two or more β, KL at the smallest β minus KL
    at the largest, and whether the means are monotone, with the KLs listed.
(e) SimPO's average-log-likelihood agreement with the preference is above 0.5 (SimPO paper §2.2): per seed;
    with one seed, over the held-out pairs (one per prompt by default, so independent): the share − 0.5
    with the row's binomial SE and df = pairs − 1.
(f) Online DPO ≥ offline DPO at equal KL (Guo et al. 2024, §4: pairs sampled from the current policy beat
    a fixed set of pairs), offline DPO on the experiment's pairs.

(c) covers every method's rows alike (kto, orpo and online_dpo included).

"At equal KL" (a, b, f) compares two frontiers — a method's rows on one pairs setting, sorted by their (mean) KL:

1. where their KL ranges overlap (from the means), the mean over that range [lo, hi] of the reward gap, each
   frontier interpolated linearly in KL: per seed on that seed's own KLs (a seed's frontier is held flat
   beyond its own end points), per prompt with the seed's KLs (a fixed linear combination of the rewards);
   a single point inside the other's range: lo = hi, the gap at that KL — per seed at that seed's own KL of
   the point, so a seed whose model moved further is read further along the other frontier;
2. where they do not overlap but the nearest two points' KLs are shown equal (an equivalence test: the
   paired ΔKL's confidence interval, |ΔKL| + t*·se, lies within ±``EQUAL_KL_MARGIN`` of their mean KL; a
   ΔKL merely not shown to differ is not equal KL, since a KL gap biases the reward gap towards the point
   further out), the reward gap of those two points; with one seed this needs the per-sample KLs
   (``kl.json``), without which the frontiers count as apart;
3. otherwise the reward gained over the base model per nat of KL at those two points, for information, and
   always "not separable": rewards at different KLs do not say which frontier is higher, and more units
   would not change that (the power line says to add β instead).

``rows``: one result row per model (:mod:`.report`: seed means, or the one seed's rows), read for which claims
apply, the frontiers' KL ranges and the numbers shown. ``replicates``: one row per model and unit with
``unit`` and ``reward_mean``, ``kl_mean``, ``logp_agreement`` (each may be None or absent), matched to
``rows`` by :func:`model_key` (``run``, else method, pairs and β). Keys read beyond the result row's:
``run``, ``pairs`` (None for the experiment's pairs), ``pairs_mode``, ``n_pairs``, ``logp_agreement_se``,
``heldout_pairs``; all may be absent.
"""

from __future__ import annotations

import math

from .stats import (
    HELD,
    LEVEL,
    MAX_UNITS,
    NOT_HELD,
    NOT_SEPARABLE,
    critical_value,
    has_spread,
    paired,
    units_to_separate,
    verdict,
)

SEED, PROMPT = "seed", "prompt"  # the units of replication
EQUAL_KL_MARGIN = 0.1  # two points are "at equal KL" when ΔKL's interval is within ±10% of their mean KL
UNIT_NAMES = {SEED: "seeds", PROMPT: "held-out prompts", "pair": "held-out pairs"}

__all__ = [
    "HELD",
    "NOT_HELD",
    "NOT_SEPARABLE",
    "PROMPT",
    "SEED",
    "claims_markdown",
    "compare_at_equal_kl",
    "evaluate_claims",
    "format_claims",
    "interpolation_weights",
    "model_key",
    "prompt_replicates",
    "seed_replicates",
    "verdict",
]


# ---- units -----------------------------------------------------------------------------------------------


def series_label(method: str, pairs: str | None) -> str:
    """``dpo``, or ``dpo [all-n48]`` on a pairs variant."""
    return method if pairs is None else f"{method} [{pairs}]"


def _point(row: dict) -> str:
    return f"{series_label(row['method'], row.get('pairs'))} β={row['beta']:g}"


def model_key(row: dict) -> str:
    """What matches a model's result row to its replicate rows: ``run``, else ``method [pairs] β=…``."""
    if row.get("run"):
        return row["run"]
    return "base" if row["method"] == "base" else _point(row)


def seed_replicates(rows_by_seed: list[dict]) -> list[dict]:
    """Replicate rows from per-seed result rows: the seed is the unit."""
    return [{**r, "unit": r["seed"]} for r in rows_by_seed]


def prompt_replicates(rows: list[dict], per_sample: dict[str, dict], samples_per_prompt: int) -> list[dict]:
    """Replicate rows of one seed, one per model and held-out prompt: the mean reward and mean per-sample KL
    (log π_θ(y|x) − log π_ref(y|x)) over that prompt's samples.

    ``per_sample[model_key(row)]``: ``{"rewards": [...], "kl": [...] or None}``, flat in prompt order, the
    ``samples_per_prompt`` slots of a prompt together (``eval/<run>/rewards.json`` and ``kl.json``); a model
    without an entry gets no replicate rows. Example: rewards [1, 2, 3, 5], 2 per prompt -> prompt 0: 1.5,
    prompt 1: 4.0.
    """
    m, out = samples_per_prompt, []
    for row in rows:
        data = per_sample.get(model_key(row))
        if data is None:
            continue
        rewards, kl = data["rewards"], data.get("kl")
        if len(rewards) % m or (kl is not None and len(kl) != len(rewards)):
            raise ValueError(f"{model_key(row)}: {len(rewards)} rewards, not whole prompts of {m} samples")
        for p in range(len(rewards) // m):
            chunk = slice(p * m, (p + 1) * m)
            out.append(
                {
                    "run": model_key(row),
                    "unit": p,
                    "reward_mean": math.fsum(rewards[chunk]) / m,
                    "kl_mean": None if kl is None else math.fsum(kl[chunk]) / m,
                }
            )
    return out


def _by_unit(replicates: list[dict]) -> dict:
    """``{unit: {model_key: replicate row}}`` in order of first appearance."""
    table: dict = {}
    for r in replicates:
        table.setdefault(r["unit"], {})[model_key(r)] = r
    return table


class _Missing(Exception):
    """A model, or one of its values, absent in a unit."""


def _get(table: dict, key: str, field: str) -> float:
    """``table[key][field]``, or :class:`_Missing` when the model or the value is absent (None)."""
    value = table.get(key, {}).get(field)
    if value is None:
        raise _Missing
    return value


def _per_unit(units: dict, fn) -> dict:
    """``{unit: fn(that unit's table)}`` over the units where ``fn`` finds every value it reads (:func:`_get`)
    and returns a number."""
    out = {}
    for unit, table in units.items():
        try:
            value = fn(table)
        except _Missing:
            continue
        if value is not None:
            out[unit] = value
    return out


# ---- one decided claim -----------------------------------------------------------------------------------


def _power(d, se, n: int, unit: str, decided: str) -> tuple[int | None, str | None]:
    """(units that would separate d, the power line) for a not-separable claim; (None, None) otherwise."""
    if decided != NOT_SEPARABLE:
        return None, None
    name = UNIT_NAMES.get(unit, unit)
    if d is None or se is None:
        return None, f"fewer than two {name} with a value: no spread to scale"
    if d == 0 or not has_spread(d, se):
        return (
            None,
            f"d = {d:+.3g} with no spread over {n} {name} (the same values in each): nothing to scale",
        )
    sd = se * math.sqrt(n)
    needed = units_to_separate(d, sd)
    direction = "held" if d > 0 else "not held"
    count = f"more than {MAX_UNITS:,}" if needed >= MAX_UNITS else str(needed)
    return needed, (
        f"{count} {name} would separate d = {d:+.3f} at the observed spread (sd {sd:.3f} over {n} {name}),"
        f" reading {direction}"
    )


def _decided(claim, statement, scope, d, se, df, n, unit, detail, per_unit=None, forced=None) -> dict:
    """One claims.json record: the paired difference, its SE, df and critical value, the verdict and, when
    not separable, the power line (``forced``: a verdict fixed by the claim, case 3)."""
    decided = forced or verdict(d, se, df)
    needed, line = _power(d, se, n, unit, decided)
    if forced:
        name = UNIT_NAMES.get(unit, unit)
        line = (
            f"more {name} cannot decide it: the frontiers must meet in KL (add points so that their KL ranges"
            " overlap: β, or a learning rate or step count where β moves KL little)"
        )
    return {
        "claim": claim,
        "statement": statement,
        "scope": scope,
        "verdict": decided,
        "difference": d,
        "se": se,
        "df": df,
        "critical": None if df is None else critical_value(df),
        "test": f"paired, one-sided {LEVEL:.1%} each way (Student's t)",
        "unit": unit,
        "n_units": n,
        "per_unit": None if per_unit is None else [[u, v] for u, v in per_unit.items()],
        "units_to_separate": needed,
        "power": line,
        "detail": detail,
    }


def _paired_claim(claim, statement, scope, per_unit: dict, unit, detail, forced=None) -> dict:
    d, se, df = paired(list(per_unit.values()))
    return _decided(claim, statement, scope, d, se, df, len(per_unit), unit, detail, per_unit, forced)


# ---- frontiers -------------------------------------------------------------------------------------------


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


def mean_over_range(points: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Mean over [lo, hi] of the curve through ``points`` (kl, reward) interpolated linearly in KL and held
    flat beyond its ends (the value at lo when lo == hi); the points need not be sorted. Exact: the curve is
    linear between its knots, so the trapezoid rule over lo, the knots inside and hi is its integral.
    Example: [(1, 1.2), (3, 1.6)] over [2, 3] -> the value at 2.5 = 1.5; [(2.5, 1.1), (4, 1.3)] over [2, 3]
    -> (0.5·1.1 + 0.5·(1.1 + 1.1333)/2)/1 = 1.11667."""
    points = sorted(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]

    def at(x: float) -> float:
        return sum(w * y for w, y in zip(interpolation_weights(xs, x), ys))

    if lo == hi:
        return at(lo)
    knots = [lo, *(x for x in xs if lo < x < hi), hi]
    area = math.fsum((k1 - k0) * (at(k0) + at(k1)) / 2 for k0, k1 in zip(knots, knots[1:]))
    return area / (hi - lo)


def _gain_per_nat(reward: float, base_reward: float, kl: float) -> float | None:
    return None if kl <= 0 else (reward - base_reward) / kl


def compare_at_equal_kl(
    a: list[dict], b: list[dict], units: dict, unit: str = SEED, base: dict | None = None
) -> dict:
    """Per-unit reward gaps of frontier ``a`` minus frontier ``b`` at equal KL (the three cases of the module
    docstring), decided as a paired claim.

    ``a``, ``b``: result rows sorted by KL (:func:`frontier`); ``units``: ``{unit: {model_key: replicate}}``;
    ``unit``: SEED interpolates each seed on its own KLs, PROMPT on the rows' KLs. Returns ``{"per_unit",
    "basis", "detail", "panel", "forced"}``: ``basis`` is ``overlap``, ``nearest`` or ``apart`` (case 3,
    ``forced`` not separable, the per-unit values gains per nat of ``a`` minus ``b``, empty without a base);
    ``panel`` what :func:`preftune.experiments.report.plot_claim` draws.
    """
    xa, xb = [r["kl_mean"] for r in a], [r["kl_mean"] for r in b]
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    name_a = series_label(a[0]["method"], a[0].get("pairs"))
    name_b = series_label(b[0]["method"], b[0].get("pairs"))
    ka, kb = [model_key(r) for r in a], [model_key(r) for r in b]
    panel = {
        "a": {"label": name_a, "points": [_panel_point(r) for r in a]},
        "b": {"label": name_b, "points": [_panel_point(r) for r in b]},
    }

    def kl_of(table: dict, key: str, row: dict) -> float:  # the unit's own KL per seed, the row's per prompt
        return _get(table, key, "kl_mean") if unit == SEED else row["kl_mean"]

    def curve(table: dict, keys: list[str], rows: list[dict]) -> list[tuple[float, float]]:
        return [(kl_of(table, k, r), _get(table, k, "reward_mean")) for k, r in zip(keys, rows)]

    point = a if len(a) == 1 else b if len(b) == 1 else None
    if lo <= hi:
        # one point inside the other frontier's range: per seed, both read at that seed's own KL of the point
        own = model_key(point[0]) if lo == hi and point is not None and unit == SEED else None

        def gap(t: dict) -> float:
            x0, x1 = (_get(t, own, "kl_mean"),) * 2 if own else (lo, hi)
            return mean_over_range(curve(t, ka, a), x0, x1) - mean_over_range(curve(t, kb, b), x0, x1)

        per_unit = _per_unit(units, gap)
        where = f"at KL {lo:.2f}" if lo == hi else f"averaged over KL {lo:.2f}–{hi:.2f}"
        if own:
            where = f"at each seed's own KL of {name_a if point is a else name_b} (mean {lo:.2f})"
        interpolated = "each seed's frontier" if unit == SEED else "each frontier"
        detail = f"reward {name_a} − {name_b} {where}, {interpolated} interpolated linearly in KL"
        panel["overlap"] = [lo, hi]
        return {"per_unit": per_unit, "basis": "overlap", "detail": detail, "panel": panel, "forced": None}
    i, j = min(
        ((i, j) for i in range(len(a)) for j in range(len(b))), key=lambda ij: abs(xa[ij[0]] - xb[ij[1]])
    )
    ra, rb, key_a, key_b = a[i], b[j], ka[i], kb[j]
    panel["nearest"] = [[xa[i], ra["reward_mean"]], [xb[j], rb["reward_mean"]]]
    dkl = _per_unit(units, lambda t: _get(t, key_a, "kl_mean") - _get(t, key_b, "kl_mean"))
    dk, sk, df = paired(list(dkl.values()))
    kls = f"KL {_point(ra)} {xa[i]:.2f} vs {_point(rb)} {xb[j]:.2f}"
    margin = EQUAL_KL_MARGIN * (xa[i] + xb[j]) / 2
    if dk is not None and sk is not None and abs(dk) + critical_value(df) * sk <= margin:
        per_unit = _per_unit(units, lambda t: _get(t, key_a, "reward_mean") - _get(t, key_b, "reward_mean"))
        detail = (
            f"KL ranges do not overlap but {kls} are equal within ±{margin:.2f} nats (ΔKL {dk:+.2f} ± {sk:.2f},"
            f" t*({df}) = {critical_value(df):.2f}): reward gap"
        )
        return {"per_unit": per_unit, "basis": "nearest", "detail": detail, "panel": panel, "forced": None}
    noise = "no per-unit KL" if sk is None else f"ΔKL {dk:+.2f} ± {sk:.2f}, not within ±{margin:.2f} at t*"
    detail = f"KL ranges do not overlap ({kls}, {noise}): rewards at different KLs do not say which frontier is higher"
    per_unit = {}
    if base is not None:
        bk = model_key(base)

        def gain_gap(t: dict) -> float | None:
            ga = _gain_per_nat(_get(t, key_a, "reward_mean"), _get(t, bk, "reward_mean"), kl_of(t, key_a, ra))
            gb = _gain_per_nat(_get(t, key_b, "reward_mean"), _get(t, bk, "reward_mean"), kl_of(t, key_b, rb))
            return None if ga is None or gb is None else ga - gb

        per_unit = _per_unit(units, gain_gap)
        detail += "; difference shown: reward gained over the base per nat of KL, the first minus the second"
    return {"per_unit": per_unit, "basis": "apart", "detail": detail, "panel": panel, "forced": NOT_SEPARABLE}


def _panel_point(row: dict) -> dict:
    return {k: row.get(k) for k in ("beta", "kl_mean", "kl_se", "reward_mean", "reward_se")}


# ---- the claims ------------------------------------------------------------------------------------------


def _base(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == "base" and r.get("reward_mean") is not None), None)


def _frontier_claim(claim, statement, scope, a, b, base, units, unit) -> dict:
    c = compare_at_equal_kl(a, b, units, unit, base)
    record = _paired_claim(claim, statement, scope, c["per_unit"], unit, c["detail"], c["forced"])
    return record | {"basis": c["basis"], "panel": c["panel"]}


def claim_dpo_vs_ppo(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
    """(a) DPO ≥ PPO at equal KL, on the experiment's pairs (PPO trains from prompts)."""
    dpo, ppo = frontier(rows, "dpo"), frontier(rows, "ppo")
    if not dpo or not ppo:
        return []
    return [
        _frontier_claim("a", "DPO ≥ PPO at equal KL", "default pairs", dpo, ppo, _base(rows), units, unit)
    ]


def _pairs_scope(rows: list[dict], pairs: str | None) -> str:
    n = next((r.get("n_pairs") for r in rows if r.get("pairs") == pairs and r.get("n_pairs")), None)
    name = "default pairs" if pairs is None else f"pairs {pairs}"
    return name if n is None else f"{name} ({n} pairs)"


def claim_odpo_vs_dpo(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
    """(b) ODPO ≥ DPO at equal KL per pairs setting both ran on, then whether the gain is larger with fewer
    pairs: per pair mode with two or more pair counts, per unit the gain on the fewest minus the gain on the
    most (only gains measured at equal KL, cases 1 and 2)."""
    settings = {r.get("pairs") for r in rows if r["method"] == "odpo"} & {
        r.get("pairs") for r in rows if r["method"] == "dpo"
    }
    base, claims, gains = _base(rows), [], {}
    for pairs in sorted(settings, key=lambda p: (p is not None, p or "")):
        odpo, dpo = frontier(rows, "odpo", pairs), frontier(rows, "dpo", pairs)
        if not odpo or not dpo:
            continue
        scope = _pairs_scope(rows, pairs)
        c = _frontier_claim("b", "ODPO ≥ DPO at equal KL", scope, odpo, dpo, base, units, unit)
        claims.append(c)
        mode, n = dpo[0].get("pairs_mode"), dpo[0].get("n_pairs")
        if c["basis"] != "apart" and mode is not None and n is not None:
            gains.setdefault(mode, []).append((n, c))
    for mode, found in gains.items():
        few, many = min(found, key=lambda g: g[0]), max(found, key=lambda g: g[0])
        if few[0] == many[0]:
            continue
        g_few, g_many = dict(map(tuple, few[1]["per_unit"])), dict(map(tuple, many[1]["per_unit"]))
        per_unit = {u: g_few[u] - g_many[u] for u in g_few if u in g_many}
        detail = (
            f"per {unit}: ODPO − DPO gain with {few[0]} pairs (mean {_signed(few[1]['difference'])}) minus with"
            f" {many[0]} pairs (mean {_signed(many[1]['difference'])})"
        )
        scope = f"{mode} pairs, {few[0]} vs {many[0]}"
        statement = "ODPO's gain over DPO is larger with fewer pairs"
        claims.append(_paired_claim("b", statement, scope, per_unit, unit, detail))
    return claims


def claim_above_base(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
    """(c) every trained model's reward above the base model's, with its KL beside it."""
    # the base row even when its seed mean is missing: the claims are paired per seed
    base = next((r for r in rows if r["method"] == "base"), None)
    if base is None:
        return []
    claims, bk = [], model_key(base)
    for r in rows:
        if r["method"] == "base":
            continue
        key = model_key(r)
        per_unit = _per_unit(
            units, lambda t, key=key: _get(t, key, "reward_mean") - _get(t, bk, "reward_mean")
        )
        kl = "-" if r.get("kl_mean") is None else f"{r['kl_mean']:.2f} ± {_num(r.get('kl_se'))}"
        reward, base_reward = _num(r.get("reward_mean"), 3), _num(base.get("reward_mean"), 3)
        detail = f"reward {reward} vs base {base_reward}, at KL {kl} nats"
        missing = [u for u in units if u not in per_unit]  # a model is never dropped without a word
        if missing:
            name = UNIT_NAMES.get(unit, unit)
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            rest = "paired over the rest" if per_unit else f"no {name} to pair"
            detail += (
                f"; no reward (model's or base's) in {name} {', '.join(map(str, missing[:5]))}{more} ({rest})"
            )
        claims.append(
            _paired_claim("c", "above the base model (its KL beside it)", _point(r), per_unit, unit, detail)
        )
    return claims


def claim_kl_grows(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
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
        small, large = model_key(points[-1]), model_key(points[0])
        per_unit = _per_unit(units, lambda t, s=small, g=large: _get(t, s, "kl_mean") - _get(t, g, "kl_mean"))
        listed = ", ".join(f"β={p['beta']:g}: {p['kl_mean']:.2f}" for p in points)
        detail = (
            f"KL at smallest β minus at largest; KLs {listed} ({'monotone' if monotone else 'not monotone'})"
        )
        scope = series_label(method, pairs)
        record = _paired_claim("d", "KL grows as β shrinks", scope, per_unit, unit, detail)
        claims.append(record | {"monotone": monotone})
    return claims


def claim_simpo_agreement(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
    """(e) SimPO's average-log-likelihood agreement with the preference above 0.5: per unit when the replicates
    carry it (seeds), else the row's share over its held-out pairs with its binomial SE."""
    claims, statement = [], "SimPO's likelihood–preference agreement above 0.5"
    for r in rows:
        if r["method"] != "simpo" or r.get("logp_agreement") is None:
            continue
        key = model_key(r)
        per_unit = _per_unit(units, lambda t, key=key: _get(t, key, "logp_agreement") - 0.5)
        detail = f"avg-logp agreement {r['logp_agreement']:.3f} on held-out pairs, minus 0.5"
        if per_unit:
            claims.append(_paired_claim("e", statement, _point(r), per_unit, unit, detail))
            continue
        n, se = r.get("heldout_pairs"), r.get("logp_agreement_se")
        df = None if not n or n < 2 else n - 1
        if se is None or df is None:
            detail += " (no standard error or pair count)"
        d = r["logp_agreement"] - 0.5
        claims.append(_decided("e", statement, _point(r), d, se, df, n or 0, "pair", detail))
    return claims


def claim_online_vs_offline_dpo(rows: list[dict], units: dict, unit: str = SEED) -> list[dict]:
    """(f) online DPO ≥ offline DPO at equal KL, offline DPO on the experiment's pairs (online DPO makes its
    own pairs from the training prompts)."""
    online, offline = frontier(rows, "online_dpo"), frontier(rows, "dpo")
    if not online or not offline:
        return []
    statement = "online DPO ≥ offline DPO at equal KL"
    return [_frontier_claim("f", statement, "default pairs", online, offline, _base(rows), units, unit)]


CLAIMS = (
    claim_dpo_vs_ppo,
    claim_odpo_vs_dpo,
    claim_above_base,
    claim_kl_grows,
    claim_simpo_agreement,
    claim_online_vs_offline_dpo,
)


def evaluate_claims(rows: list[dict], replicates: list[dict], unit: str = SEED) -> list[dict]:
    """Every claim whose methods are present, in the order (a)–(f): claims.json's records ``{"claim",
    "statement", "scope", "verdict", "difference", "se", "df", "critical", "unit", "n_units", "per_unit",
    "units_to_separate", "power", "detail", ...}`` (frontier claims add ``basis`` and ``panel``).

    ``replicates``: per-unit rows (:func:`seed_replicates`, :func:`prompt_replicates`); ``unit``: SEED or
    PROMPT. Without replicates every claim is not separable (nothing to pair)."""
    if unit not in (SEED, PROMPT):
        raise ValueError(f"evaluate_claims: unit must be {SEED!r} or {PROMPT!r}, got {unit!r}")
    units = _by_unit(replicates)
    return [c for check in CLAIMS for c in check(rows, units, unit)]


# ---- text ------------------------------------------------------------------------------------------------


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _numbers(c: dict) -> str:
    if c["difference"] is None:
        return "no difference computable"
    text = f"d = {c['difference']:+.3f} ± {_num(c['se'], 3)}"
    if c["df"] is not None:
        text += f", t*({c['df']}) = {c['critical']:.2f} over {c['n_units']} {UNIT_NAMES.get(c['unit'], c['unit'])}"
    return text


def format_claims(claims: list[dict]) -> str:
    """One line per claim for the terminal (and the power line of each not-separable one)."""
    lines = []
    for c in claims:
        lines.append(
            f"({c['claim']}) {c['statement']} — {c['scope']}: {c['verdict']} ({_numbers(c)}; {c['detail']})"
        )
        if c.get("power"):
            lines.append(f"    power: {c['power']}")
    return "\n".join(lines)


RULE = [
    "Each claim is a **paired** difference: one value per seed (with one seed, per held-out prompt), since every",
    "model of a seed is evaluated on the same prompts with the same random numbers. d is their mean, se their",
    "sd/√n, and t* the 97.5% quantile of Student's t with n − 1 degrees of freedom (4.30 for 3 seeds):",
    "**held** if d > t*·se in the claimed direction, **not held** if d < −t*·se, else **not separable**",
    "(also whenever se is missing or 0). A not-separable claim says how many seeds (or prompts) would separate",
    "its d at its spread. At equal KL: the mean reward gap over the KL range both frontiers cover, each seed's",
    "frontier interpolated linearly in KL, or the nearest points when their KLs are equal within noise;",
    "frontiers apart in KL are not separable, whatever the number of seeds. With one seed the SE holds the",
    "evaluation's noise only, not the training's: a verdict is about these trained models, not the methods.",
]


def claims_markdown(claims: list[dict], figures: dict[int, str] | None = None) -> str:
    """report.md's Claims section: the rule, then one bullet per claim with its power line, and its panel
    (``figures``: claim index -> image path, e.g. from :func:`preftune.experiments.report.plot_claims`)."""
    lines = [*RULE, ""]
    if not claims:
        return "\n".join(lines + ["No claim applies to the methods of this experiment."])
    figures = figures or {}
    last = {image: i for i, image in sorted(figures.items())}  # a figure shared by claims: after the last
    for i, c in enumerate(claims):
        lines.append(
            f"- **({c['claim']}) {c['statement']}** — {c['scope']}: **{c['verdict']}**, {_numbers(c)}"
            f" ({c['detail']})"
        )
        if c.get("power"):
            lines.append(f"  - power: {c['power']}")
        image = figures.get(i)
        if image is not None and last[image] == i:
            lines += ["", f"  ![claim ({c['claim']})]({image})", ""]
    return "\n".join(lines).rstrip()
