"""Evaluation metrics (pure numpy; tensors are accepted), shared by the experiment and online training.

- :func:`mean_and_se`: mean reward with its standard error.
- :func:`sequence_kl`: the sequence-level KL(π_θ‖π_ref) estimate of the DPO paper §6.1.
- :func:`win_rate`: policy vs base reward, paired by prompt and sample slot.
- :func:`avg_logp_agreement`: SimPO's diagnostic (Meng et al. 2024, arXiv 2405.14734,
  §2.2): how often the length-averaged log-likelihood ranks a pair like the preference;
  :func:`proportion_se` the standard error of such a share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _as_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names}: lengths differ ({len(a)} vs {len(b)})")
    if len(a) == 0:
        raise ValueError(f"{names}: empty")


def mean_and_se(values: Sequence[float], clusters: Sequence | None = None) -> tuple[float, float]:
    """Mean and standard error of the mean.

    Without ``clusters``: se = std(ddof=1) / sqrt(n). With ``clusters`` (one label per value, e.g. the prompt
    each sample answers), the cluster-robust standard error: samples of one prompt are not independent, so

        se² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / n²     (G clusters, n values)

    which for G clusters of one value each is the plain formula. A single value (or a single cluster) has
    se 0.0; an empty input raises ``ValueError``.
    Example: [1, 2, 3, 4] -> mean 2.5, std = sqrt(5/3) = 1.2910, se = 1.2910 / 2 = 0.6455; clustered as
    [a, a, b, b]: cluster sums of deviations -2, +2 -> se² = 2 · 8 / 16 = 1, se = 1.0.
    """
    arr = _as_array(values, "values")
    n = len(arr)
    if n == 0:
        raise ValueError("mean_and_se of an empty sequence")
    mean = float(arr.mean())
    if clusters is None:
        return (mean, 0.0) if n == 1 else (mean, float(arr.std(ddof=1) / math.sqrt(n)))
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"mean_and_se: {n} values but {len(labels)} cluster labels")
    sums: dict = {}
    for label, deviation in zip(labels, arr - mean):
        sums[label] = sums.get(label, 0.0) + deviation
    g = len(sums)
    if g == 1:
        return mean, 0.0
    variance = g / (g - 1) * sum(s * s for s in sums.values()) / n**2
    return mean, float(math.sqrt(variance))


def sequence_kl(
    policy_logps: Sequence[float], ref_logps: Sequence[float], clusters: Sequence | None = None
) -> tuple[float, float]:
    """Monte-Carlo estimate of the sequence-level KL(π_θ‖π_ref) and its standard error.

    For samples y_i ~ π_θ(·|x_i) (one entry per sample; ``policy_logps[i]`` =
    log π_θ(y_i|x_i) and ``ref_logps[i]`` = log π_ref(y_i|x_i), summed over response
    tokens), d_i = log π_θ(y_i|x_i) − log π_ref(y_i|x_i) and

        KL(π_θ‖π_ref) = E_{y~π_θ}[log π_θ(y|x) − log π_ref(y|x)] ≈ mean_i d_i,

    averaged over prompts too. The mean is an unbiased estimate of the KL; single d_i can
    be negative, so the estimate can be slightly negative by sampling noise when the true
    KL is near 0 (the base model against itself gives exactly 0). Valid only for samples
    drawn from π_θ itself: temperature 1, top_p 1, no top-k, and the log-probs evaluated
    on exactly the sampled tokens (including the EOS token when one was generated). At a
    sampling temperature T ≠ 1 (online training) it is the KL between the tempered
    policies, softmax(z/T) of each, when both log-probs are taken at T (as the online
    evaluator does); top_p < 1 has no such reading and is refused wherever this is used.
    """
    p = _as_array(policy_logps, "policy_logps")
    r = _as_array(ref_logps, "ref_logps")
    _same_length(p, r, "sequence_kl(policy_logps, ref_logps)")
    return mean_and_se(p - r, clusters)


def win_rate(policy_rewards: Sequence[float], base_rewards: Sequence[float]) -> float:
    """Fraction of paired samples where the policy's reward beats the base model's.

    Element i of both inputs must come from the same prompt and sample slot. Each pair
    scores 1 for a win, 0.5 for a tie, 0 for a loss; the result is the mean.
    Example: policy [2, 1, 0.5], base [1, 1, 1] -> (1 + 0.5 + 0) / 3 = 0.5.
    """
    p = _as_array(policy_rewards, "policy_rewards")
    b = _as_array(base_rewards, "base_rewards")
    _same_length(p, b, "win_rate(policy_rewards, base_rewards)")
    return float(np.mean((p > b) + 0.5 * (p == b)))


def win_rate_and_se(
    policy_rewards: Sequence[float], base_rewards: Sequence[float], clusters: Sequence | None = None
) -> tuple[float, float]:
    """:func:`win_rate` with its standard error (clustered by prompt when ``clusters`` is given)."""
    p = _as_array(policy_rewards, "policy_rewards")
    b = _as_array(base_rewards, "base_rewards")
    _same_length(p, b, "win_rate(policy_rewards, base_rewards)")
    return mean_and_se((p > b) + 0.5 * (p == b), clusters)


def proportion_se(successes: int, n: int) -> float:
    """Standard error of a share of ``n`` independent yes/no outcomes, √(p̃(1 − p̃)/n) with the share shrunk
    to p̃ = (successes + 1)/(n + 2), so that all or none of a few outcomes does not read as certain (the plain
    √(p(1 − p)/n) is 0 there).
    Example: 32 of 64 -> p̃ 0.5, se 0.0625; 3 of 3 -> p̃ 0.8, se √(0.16/3) = 0.231.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"proportion_se: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    shrunk = (successes + 1) / (n + 2)
    return math.sqrt(shrunk * (1 - shrunk) / n)


def avg_logp_agreement(
    chosen_logps: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_logps: Sequence[float],
    rejected_lengths: Sequence[int],
) -> float:
    """Fraction of pairs whose length-averaged log-likelihood ranks chosen above rejected.

    A pair agrees when log π_θ(y_w|x) / max(|y_w|, 1) > log π_θ(y_l|x) / max(|y_l|, 1)
    (strictly; a tie counts as disagreement). SimPO reports about 50% after DPO training,
    which motivates its length-normalised implicit reward.
    Example: chosen (-4, len 2) vs rejected (-9, len 3): -2 > -3, agrees.
    """
    cw = _as_array(chosen_logps, "chosen_logps")
    lw = _as_array(chosen_lengths, "chosen_lengths")
    cl = _as_array(rejected_logps, "rejected_logps")
    ll = _as_array(rejected_lengths, "rejected_lengths")
    _same_length(cw, lw, "avg_logp_agreement(chosen_logps, chosen_lengths)")
    _same_length(cl, ll, "avg_logp_agreement(rejected_logps, rejected_lengths)")
    _same_length(cw, cl, "avg_logp_agreement(chosen_logps, rejected_logps)")
    return float(np.mean(cw / np.maximum(lw, 1.0) > cl / np.maximum(ll, 1.0)))
