"""The statistics the claims are decided with (pure Python: no scipy): Student's t, the paired test and its power.

A claim's evidence is one paired difference per *unit* of replication, d_1 … d_n: per seed (each seed trains
and evaluates every model with the same random numbers), or, with one seed, per held-out prompt (every model
answers the same prompts in the same sample slots). Then

    d = mean(d_u),   se = sd(d_u)/√n,   df = n − 1,   t* = the 97.5% quantile of Student's t with df

and the verdict is one-sided each way: **held** if d > t*·se, **not held** if d < −t*·se, else **not
separable**. Under the null (the claimed difference is 0) and normal d_u, "held" comes out 2.5% of the time
whatever the correlation between the two models the d_u compare (the pairing removes it). A missing or zero
se is "not separable", never "held": no spread over fewer than two units, or two identical models, say nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

HELD, NOT_HELD, NOT_SEPARABLE = "held", "not held", "not separable"
LEVEL = 0.975  # one-sided: a false "held" (or a false "not held") 2.5% of the time under the null
MAX_UNITS = 10**7  # the power search stops here

__all__ = [
    "HELD",
    "LEVEL",
    "NOT_HELD",
    "NOT_SEPARABLE",
    "critical_value",
    "has_spread",
    "paired",
    "t_cdf",
    "t_pdf",
    "t_quantile",
    "t_quantile_series",
    "units_to_separate",
    "verdict",
]


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz; Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom (``math.inf``: the standard normal):
    P(|T| > |t|) = I_{df/(df+t²)}(df/2, 1/2). Example: t_cdf(4.303, 2) = 0.975."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_pdf(t: float, df: float) -> float:
    """The density of Student's t with ``df`` degrees of freedom (``math.inf``: the standard normal)."""
    if math.isinf(df):
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: Newton's method on :func:`t_cdf`,
    kept inside a bracket (a step that leaves it bisects instead); cached.
    Examples: t_quantile(0.975, 2) = 4.303, (0.975, 4) = 2.776, (0.975, 29) = 2.045, (0.975, inf) = 1.960."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 2.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    t = 0.5 * (lo + hi)
    for _ in range(100):
        excess = t_cdf(t, df) - p
        if excess == 0.0:
            return t
        lo, hi = (t, hi) if excess < 0 else (lo, t)
        step = excess / t_pdf(t, df)
        t = t - step if lo <= t - step <= hi else 0.5 * (lo + hi)
        if abs(step) < 1e-12 * max(1.0, t) or hi - lo < 1e-12 * max(1.0, hi):
            break
    return t


def t_quantile_series(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t for large ``df`` from the normal one, z: the Cornish–Fisher series
    t = z + g₁/ν + g₂/ν² + g₃/ν³ + g₄/ν⁴ (Abramowitz & Stegun 26.7.5); within 1e-10 of :func:`t_quantile`
    from df 100 on, and far cheaper (the power search asks for thousands of df)."""
    z = t_quantile(p, math.inf)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


SERIES_FROM = 100  # df from which critical_value uses the series
_CRITICAL: dict[float, float] = {}


def critical_value(df: float) -> float:
    """t* = the LEVEL quantile of t with ``df`` degrees of freedom: :func:`t_quantile` below df 100, the
    series above; cached (the claims ask for the same few df many times)."""
    if df not in _CRITICAL:
        exact = df < SERIES_FROM or math.isinf(df)
        _CRITICAL[df] = t_quantile(LEVEL, df) if exact else t_quantile_series(LEVEL, df)
    return _CRITICAL[df]


def has_spread(difference: float, se: float) -> bool:
    """Whether ``se`` is above 0 beyond rounding (1e-12 of |d|, or of 1): per-unit differences that are all
    equal (the same model twice, to the last bit or the last rounding) have none, and decide nothing."""
    return se > 1e-12 * max(1.0, abs(difference))


def verdict(difference: float | None, se: float | None, df: float | None) -> str:
    """``held`` if d > t*·se, ``not held`` if d < −t*·se, else ``not separable`` — and always not separable
    when d, se or df is missing, df < 1, or se is 0 (:func:`has_spread`)."""
    if difference is None or se is None or df is None or df < 1 or not has_spread(difference, se):
        return NOT_SEPARABLE
    bound = critical_value(df) * se
    if difference > bound:
        return HELD
    if difference < -bound:
        return NOT_HELD
    return NOT_SEPARABLE


def paired(differences: Sequence[float]) -> tuple[float | None, float | None, int | None]:
    """(d, se, df) of per-unit paired differences: their mean, sd(ddof=1)/√n and n − 1; se and df are None
    with fewer than two units, and everything is None with none.
    Example: [0.1, 0.3, 0.2] -> d 0.2, sd 0.1, se 0.1/√3 = 0.0577, df 2."""
    n = len(differences)
    if n == 0:
        return None, None, None
    mean = math.fsum(differences) / n
    if n < 2:
        return mean, None, None
    var = math.fsum((x - mean) ** 2 for x in differences) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n), n - 1


def units_to_separate(difference: float, sd: float) -> int | None:
    """The fewest units n (≥ 2) at which a true difference ``difference`` with per-unit spread ``sd`` would be
    separated by the verdict's rule at its expected size: |d| > t*(n − 1)·sd/√n. None when d or sd is 0
    (no difference, or no spread to scale), ``MAX_UNITS`` when even that many would not do.
    Example: d 0.024, sd 0.036 -> 12 (t*(11)·0.036/√12 = 0.0229 < 0.024; at n = 11, 0.0242 > 0.024).

    t*(n − 1) > z* (the normal quantile), so no n ≤ (z*·sd/d)² separates: the search starts there and
    counts up (t*(n − 1)/√n falls as n grows, so the first n that separates is the answer; a few steps)."""
    if difference == 0 or not sd > 0:
        return None
    ratio = (critical_value(math.inf) * sd / abs(difference)) ** 2
    if ratio >= MAX_UNITS:
        return MAX_UNITS
    n = max(2, math.floor(ratio) + 1)
    while abs(difference) <= critical_value(n - 1) * sd / math.sqrt(n):
        if n >= MAX_UNITS:
            return MAX_UNITS
        n += 1
    return n
