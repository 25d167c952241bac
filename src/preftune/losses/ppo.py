"""PPO-based RLHF pieces (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020; Ouyang et al. 2022):
small pure functions, each with its equation. Per-token tensors are (N, L): N completions, L positions, with
a bool mask m (N, L) that is True at completion tokens (a prefix of each row); log-probs are of the sampled
tokens. The policy's clipped loss is :func:`preftune.losses.clipped_policy_loss`, shared with GRPO.

The per-token reward folds the KL to the reference into the return (the "KL-shaped" reward):

    r_t = −β · k(log π_old(o_t) − log π_ref(o_t))  +  [t = last token] · R(x, o)

with k the k1 estimator (the difference itself, as in the papers and TRL) or k3. GAE (Schulman et al. 2016,
arXiv 1506.02438) over each completion, with the value after the last token 0:

    δ_t = r_t + γ·V_{t+1} − V_t,    Â_t = δ_t + γλ·Â_{t+1},    returns R_t = Â_t + V_t

Advantages are whitened over the batch's tokens (mean 0, std 1) before the policy loss; the value loss is
PPO's clipped one on the returns. The KL coefficient is fixed, or adaptive (Ziegler et al. §2.2): with the
batch's mean sequence KL,

    e = clip(KL / KL_target − 1, −0.2, 0.2),    β ← β · (1 + e · n / horizon)

with n and the horizon in one unit. The paper counts completions (horizon 10000 at 512 completions a batch in
lm-human-preferences' sentiment runs: β moves by up to 1.02% a batch); preftune counts batches (n = 1,
``ppo.kl_horizon_batches``, default 20: the paper's rate per batch, whatever the batch size). At our 32
completions a batch the paper's horizon in completions would move β by ≤ 0.064% a batch, i.e. not at all.

The policy's drift from π_old inside a batch is logged as ``approx_kl`` = mean over tokens of ½(log ρ)²,
ρ = π_θ/π_old at π_old's samples (:func:`approx_kl`), as lm-human-preferences and TRL do.
"""

from __future__ import annotations

import torch

from .policy_gradient import kl_penalty

PPO_KL_ESTIMATORS = ("k1", "k3")


def kl_shaped_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (N, L) and per-token KL estimates (N, L), both 0 off the mask.

    ``scores`` (N,) is each completion's reward R(x, o), placed on its last masked token (a row without
    tokens gets none); every token gets −β·KL_t, KL_t = log π_old − log π_ref (k1) or its k3 estimate."""
    if kl not in PPO_KL_ESTIMATORS:
        raise ValueError(f"the PPO reward's KL estimator must be one of {PPO_KL_ESTIMATORS}, got {kl!r}")
    m = mask.to(logps.dtype)
    kl_t = kl_penalty(logps, ref_logps, kl) * m  # k1: log π − log π_ref
    rewards = -kl_coef * kl_t
    lengths = mask.sum(dim=1)  # (N,)
    has = lengths > 0
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=rewards.device)
    bonus = torch.where(has, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rewards[rows, last] += bonus
    return rewards, kl_t


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per completion: (Â (N, L), returns Â + V (N, L)), 0 off the mask.

    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t and Â_t = δ_t + γλ·Â_{t+1}·m_{t+1}: the value and advantage after a
    completion's last token are 0 (the episode ends there)."""
    m = mask.to(values.dtype)
    v = values * m
    n, length = values.shape
    advantages = torch.zeros_like(v)
    next_adv = torch.zeros(n, dtype=v.dtype, device=v.device)
    next_value = torch.zeros(n, dtype=v.dtype, device=v.device)
    for t in range(length - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = v[:, t]
    return advantages, (advantages + v) * m


def mean_var_from_sums(
    n: float, total: float, squares: float, *, unbiased: bool = True
) -> tuple[float, float]:
    """Mean and variance from a count, Σx and Σx² (sums that several processes can add up); the unbiased
    variance is 0 below two values."""
    if n < 1:
        return 0.0, 0.0
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    if unbiased:
        var = var * n / (n - 1) if n > 1 else 0.0
    return mean, var


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased variance of ``x`` over the mask (0, 0 when it holds fewer than two values)."""
    values = x[mask.bool()].double()
    return mean_var_from_sums(values.numel(), float(values.sum()), float((values * values).sum()))


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    mean: float | None = None,
    var: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) on the mask, 0 off it. ``mean``/``var`` default to the masked statistics
    of ``x`` (pass those of every process's batch to whiten over all of them)."""
    if mean is None or var is None:
        mean, var = masked_mean_var(x, mask)
    return torch.where(mask.bool(), (x - mean) / (var + eps) ** 0.5, torch.zeros_like(x))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: (½·max((V − R)², (V_clip − R)²) (N, L), clipped (N, L) bool) with
    V_clip = V_old + clip(V − V_old, −c, c); ``clipped`` marks tokens where the clipped term is the larger."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def adaptive_kl_coef(coef: float, kl: float, *, target: float, horizon: float, n: float = 1) -> float:
    """Ziegler et al.'s proportional controller: β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon), n and the
    horizon in one unit (preftune: batches, n = 1; the paper: completions)."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n / horizon)


def approx_kl(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """½(log ρ)² per token (N, L), log ρ = log π_θ − log π_old at π_old's samples: PPO's ``approx_kl``
    diagnostic as lm-human-preferences and TRL log it. Its mean is ≈ KL(π_old‖π_θ) to second order. (k3 in
    the form x = log π_θ − log π_old would be unbiased for KL(π_old‖π_θ) under these samples, but the k3 of
    :func:`preftune.losses.kl_penalty` is the π_θ-sample form: biased here.)"""
    log_ratio = logps - old_logps
    return 0.5 * log_ratio * log_ratio


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the mask: 1 = the critic predicts the returns, ≤ 0 = no better than their
    mean. NaN when the returns do not vary."""
    m = mask.bool()
    r, e = returns[m].double(), (returns - values)[m].double()
    return explained_variance_from_sums(
        float(m.sum()), float(r.sum()), float((r * r).sum()), float(e.sum()), float((e * e).sum())
    )


def explained_variance_from_sums(n: float, r: float, r2: float, e: float, e2: float) -> float:
    """:func:`explained_variance` from sums over (possibly several processes') tokens: n tokens, Σ R, Σ R²,
    Σ (R − V), Σ (R − V)² (population variances; the ratio does not depend on the choice)."""
    if n < 1:
        return float("nan")
    var_r = mean_var_from_sums(n, r, r2, unbiased=False)[1]
    var_e = mean_var_from_sums(n, e, e2, unbiased=False)[1]
    return 1.0 - var_e / var_r if var_r > 1e-12 else float("nan")
