"""Policy-gradient pieces of the online methods (GRPO and its variants): small pure functions, each with its
equation. Per-token tensors are (N, L): N completions, L positions, with a bool mask m (N, L) that is True at
completion tokens; log-probs are of the sampled tokens.

GRPO (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, §4.1, Eq. 3): for each prompt draw G completions
from π_old, score them, Â_i from the group's rewards (the same for every token of o_i), and maximise

    min(ρ_t·Â_i, clip(ρ_t, 1−ε_low, 1+ε_high)·Â_i) − β·KL_t,     ρ_t = π_θ(o_t) / π_old(o_t).

Where preftune's options depart from the paper, and the defaults:

- ``scale`` of the advantages: the paper divides by the group's std (``group``, default). Dr. GRPO
  (Liu et al. 2025, arXiv 2503.20783) drops it (``none``): dividing up-weights groups whose rewards barely
  differ. ``batch`` divides by the std of the whole batch (one scale for every group). The std is the
  unbiased one (ddof = 1), as in TRL; eps = 1e-4 keeps a near-constant group finite.
- ``baseline``: the group mean (the paper) or RLOO's leave-one-out mean r_i − mean_{j≠i} r_j (Ahmadian et
  al. 2024, arXiv 2402.14740), an unbiased baseline (it does not use r_i itself). RLOO divides by no std:
  with ``scale: group`` it is GRPO × G/(G−1) (r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean)), so the config
  makes ``leave_one_out`` imply ``scale: none`` unless ``scale`` is set.
- ε_low = ε_high = 0.2 is the paper; DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476) raises ε_high
  (0.28) so unlikely tokens with positive advantage can grow.
- KL: the paper's k3 estimator (Schulman 2020) x → eˣ − x − 1 with x = log π_ref − log π_θ (≥ 0, unbiased);
  k2 = x²/2 is offered. As a loss term what matters is the gradient (:func:`kl_penalty`): k3's is
  ∇KL(π_ref‖π_θ) although its value estimates KL(π_θ‖π_ref), k2's is ∇KL(π_θ‖π_ref), and k1 = −x has zero
  expected gradient, so the config refuses ``kl: k1`` with β > 0. β = 0 by default, as in current practice
  (DAPO, Dr. GRPO, TRL): the clipped ratio already keeps updates small, and then no reference model is
  loaded or run at all.
- aggregation (:func:`preftune.losses.reduction.aggregate`): the paper averages each completion's tokens,
  then the completions (``sequence_mean``), so a token of a short completion weighs more than one of a long
  completion. Default ``token_mean`` (DAPO): every token of the optimizer step weighs the same, which is
  what the field (TRL's default) uses now. ``constant`` (Dr. GRPO) divides by G'·L_max, length-unbiased.
- A group whose rewards are all equal gives zero advantage (no gradient): counted in ``frac_reward_zero_std``.
- Completions without a reward (``None``) get zero advantage and are left out of their group's statistics.

The policy loss (``grpo.policy_loss``, :data:`POLICY_LOSSES`) is one of three, each a pure function below:

- ``clip`` (the paper, :func:`clipped_policy_loss`): the token-level clipped ratio above.
- ``gspo`` (Zheng et al. 2025, arXiv 2507.18071, §4.1 and §4.3, :func:`gspo_policy_loss`): one ratio per
  completion, s_i = (π_θ(o_i)/π_old(o_i))^(1/|o_i|), clipped in a range of its own (ε 3e-4 / 4e-4, §5.1),
  each completion's tokens averaged (``sequence_mean``, as verl, which forces it, and TRL's paper setup).
- ``cispo`` (MiniMax-M1, arXiv 2506.13585, §3.1, :func:`cispo_policy_loss`): REINFORCE with the
  token's importance weight clipped and detached, so no token's gradient is dropped; token mean, no lower
  bound on the weight and 1 + ε_high = 5 (TRL's recommended ε_max, ScaleRL's).

Each one's clip range and aggregation, when the config leaves them unset, is its :class:`PolicyLoss`
entry. At one update per batch of samples (π_old = sg[π_θ]) all three give the same gradient,
−Â·∇log π_θ per token, aggregated alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")
KL_ESTIMATORS = ("k1", "k2", "k3")
K3_LOG_RATIO_BOUND = 20.0  # k3: x clamped to ±20 before eˣ (verl's low_var_kl)
K3_VALUE_BOUND = 10.0  # k3's value clamped to ±10 (verl's low_var_kl, OpenRLHF's compute_approx_kl)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    baseline: str = "mean",
    valid: torch.Tensor | None = None,
    batch_std: float | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Â (N,) from rewards (N,) of N = P·G completions, grouped as P consecutive groups of G.

    Â_i = (r_i − b_i) / s, with b_i the group mean (``mean``) or the mean of the group's other rewards
    (``leave_one_out``), and s = std of the group + eps (``group``), std of the batch + eps (``batch``;
    ``batch_std`` overrides it, e.g. the std over every process's batch), or 1 (``none``). ``valid`` (N,)
    marks rewards that exist; the others get Â = 0 and are left out of the statistics. A group with fewer
    than two valid rewards, or whose valid rewards are all equal, gets Â = 0.
    """
    if group_size < 2:
        raise ValueError(
            f"group advantages need groups of at least 2 completions, got group_size={group_size}"
        )
    if scale not in SCALES or baseline not in BASELINES:
        raise ValueError(
            f"scale must be one of {SCALES} and baseline one of {BASELINES}, got {scale}, {baseline}"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (P·G,) with G = {group_size}, got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # (P, G)
    ok = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    r = torch.where(ok, r, torch.zeros_like(r))
    n = ok.sum(dim=1, keepdim=True)  # (P, 1) valid rewards per group
    total = r.sum(dim=1, keepdim=True)
    mean = total / n.clamp(min=1)  # (P, 1)
    if baseline == "mean":
        centred = r - mean  # r_i − mean(r)
    else:
        centred = r - (total - r) / (n - 1).clamp(min=1)  # r_i − mean_{j≠i} r_j
    std = torch.sqrt(
        (torch.where(ok, r - mean, torch.zeros_like(r)) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    )
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            flat = r[ok]
            batch_std = float(flat.std()) if flat.numel() > 1 else 0.0
        centred = centred / (batch_std + eps)
    high = torch.where(ok, r, torch.full_like(r, -torch.inf)).amax(dim=1, keepdim=True)
    low = torch.where(ok, r, torch.full_like(r, torch.inf)).amin(dim=1, keepdim=True)
    spread = (n >= 2) & (high > low)  # (P, 1): the group has something to learn from
    return torch.where(ok & spread, centred, torch.zeros_like(centred)).view(-1)


def zero_spread_groups(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(P,) bool: the groups of ``rewards`` (N = P·G, grouped) whose valid rewards are all equal (or fewer
    than two): their advantages are 0, so they give no gradient."""
    r = rewards.view(-1, group_size).float()
    ok = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.view(-1, group_size).bool()
    high = torch.where(ok, r, torch.full_like(r, -torch.inf)).amax(dim=1)
    low = torch.where(ok, r, torch.full_like(r, torch.inf)).amin(dim=1)
    return (ok.sum(dim=1) < 2) | (high <= low)


def zero_spread_fraction(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> float:
    """Share of groups whose valid rewards are all equal (or fewer than two): they give no gradient."""
    return float(zero_spread_groups(rewards, group_size, valid).float().mean())


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """−min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) per token, ρ = exp(log π_θ − log π_old).

    ``logps``, ``old_logps`` (N, L); ``advantages`` (N,) or (N, L). Returns (loss (N, L), ρ (N, L)).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)  # ρ_t
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), ratio


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float, eps_high: float
) -> dict[str, float]:
    """Share of completion tokens whose update the clip stopped: ``low`` (ρ < 1−ε_low with Â < 0), ``high``
    (ρ > 1+ε_high with Â > 0) and ``region`` (either)."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    return _stopped_shares("clip_ratio", ratio, adv, mask, eps_low, eps_high)


def _stopped_shares(prefix, ratio, adv, present, eps_low: float, eps_high: float) -> dict[str, float]:
    """Shares of the ``present`` entries where the clip stops the update: ρ < 1−ε_low with Â < 0 (``low``),
    ρ > 1+ε_high with Â > 0 (``high``), either (``region``); ``ratio``, ``adv``, ``present`` broadcast."""
    low = (ratio < 1.0 - eps_low) & (adv < 0) & present
    high = (ratio > 1.0 + eps_high) & (adv > 0) & present
    n = present.sum().clamp(min=1)
    return {
        f"{prefix}/low": float(low.sum() / n),
        f"{prefix}/high": float(high.sum() / n),
        f"{prefix}/region": float((low | high).sum() / n),
    }


def gspo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO's per-token loss (Zheng et al. 2025, arXiv 2507.18071): (loss (N, L), s (N,)).

    ``logps``, ``old_logps``, ``mask`` (N, L); ``advantages`` (N,) or (N, L). The sequence ratio (§4.1)

        s_i = (π_θ(o_i)/π_old(o_i))^(1/|o_i|) = exp((1/|o_i|)·Σ_t m·(log π_θ − log π_old))

    enters every token of o_i in the GSPO-token form (§4.3): s_i,t = sg[s_i]·π_θ(o_i,t)/sg[π_θ(o_i,t)], whose
    value is s_i and whose gradient is s_i·∇log π_θ(o_i,t); the loss is −min(s_i,t·Â, clip(s_i,t, 1−ε_low,
    1+ε_high)·Â). Averaged over each completion's tokens (``sequence_mean``) this is the paper's objective
    −min(s_i·Â_i, clip(s_i)·Â_i) with its gradient −Â_i·s_i·(1/|o_i|)·Σ_t ∇log π_θ(o_i,t) (unclipped), as
    TRL's ``importance_sampling_level="sequence"`` and verl's ``compute_policy_loss_gspo`` compute it; a
    clipped completion gives no gradient at all. A completion without loss tokens gets s = 1.

    Example (ε = 0.2): log-ratios [0.3, −0.1] (|o| = 2) give s = e^0.1 = 1.105; with Â = 1 the loss is −1.105
    on both tokens and both keep their gradient, although the first token's own ratio e^0.3 = 1.35 lies beyond
    the token clip (where ``clip`` would drop it).
    """
    m = mask.to(logps.dtype)
    log_s = ((logps - old_logps) * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # (N,) log s_i
    log_s_t = logps - logps.detach() + log_s.detach().unsqueeze(-1)  # (N, L) value log s_i, grad ∇log π_θ
    loss, _ = clipped_policy_loss(
        log_s_t, torch.zeros_like(log_s_t), advantages, eps_low=eps_low, eps_high=eps_high
    )
    return loss, log_s.detach().exp()


def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO's per-token loss (MiniMax-M1, arXiv 2506.13585, §3.1): (loss (N, L), ρ (N, L)).

    ``logps``, ``old_logps`` (N, L); ``advantages`` (N,) or (N, L); ``mask`` is not needed (token level).

        loss_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)]·Â·log π_θ(o_t),     ρ_t = π_θ(o_t)/π_old(o_t)

    The clipped weight is a constant: every token's gradient is −w_t·Â·∇log π_θ, never 0 (the clip only
    caps w_t), where the ``clip`` loss drops the gradient of a token beyond its range. MiniMax sets no lower
    bound (ε_low ≥ 1: 1 − ε_low ≤ 0 < ρ), only ε_high. TRL's ``loss_type="cispo"`` is
    −sg[min(ρ, ε_max)]·Â·log π_θ (ε_max = 1 + ε_high here); verl's ``compute_policy_loss_cispo`` clips
    both sides as here. The value is not ≈ 0 at ρ = 1 (it is −Â·log π_θ); the gradient is what trains.

    Example (ε_high = 0.2): ρ = 1.5, Â = 1, log π_θ = −2 give w = 1.2, loss 2.4, ∂loss/∂log π_θ = −1.2.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)  # ρ_t
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high).detach()  # sg[clip(ρ_t)]
    return -weight * adv * logps, ratio


def sequence_clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float, eps_high: float
) -> dict[str, float]:
    """GSPO: share of completions (with loss tokens) whose update the sequence clip stopped, from s (N,),
    Â (N,) and the token mask (N, L): ``low`` (s < 1−ε_low with Â < 0), ``high`` (s > 1+ε_high with Â > 0),
    ``region`` (either)."""
    adv = advantages if advantages.dim() == 1 else advantages[:, 0]
    return _stopped_shares("seq_clip_ratio", ratio, adv, mask.any(dim=-1), eps_low, eps_high)


def capped_weight_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float, eps_high: float
) -> dict[str, float]:
    """CISPO: share of completion tokens whose importance weight the clip capped (their gradient is kept,
    scaled down): ``high`` (ρ > 1+ε_high), ``low`` (ρ < 1−ε_low; 0 without a lower bound), whatever the
    sign of Â (TRL's ``cispo_clip_ratio`` counts only Â > 0)."""
    n = mask.sum().clamp(min=1)
    return {
        "is_weight_capped/high": float(((ratio > 1.0 + eps_high) & mask).sum() / n),
        "is_weight_capped/low": float(((ratio < 1.0 - eps_low) & mask).sum() / n),
    }


def _clip_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clipped_policy_loss` with the policy losses' signature (token level: no mask needed)."""
    return clipped_policy_loss(logps, old_logps, advantages, eps_low=eps_low, eps_high=eps_high)


@dataclass(frozen=True)
class PolicyLoss:
    """One ``grpo.policy_loss``: its per-token loss (logps, old_logps, Â, mask, *, eps_low, eps_high) →
    (loss (N, L), ratio), its clip metrics (ratio, Â, mask, *, eps_low, eps_high) → the shares named
    ``shares``, of ``per`` (``tokens`` or ``sequences``), and the clip range and aggregation it takes when
    the config leaves them unset."""

    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fractions: Callable[..., dict[str, float]]
    shares: tuple[str, ...]
    per: str
    epsilon_low: float
    epsilon_high: float
    aggregation: str


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "clip": PolicyLoss(  # the GRPO paper: ε 0.2 both sides; every token of the step alike (DAPO, TRL)
        loss=_clip_policy_loss,
        fractions=clip_fractions,
        shares=("clip_ratio/low", "clip_ratio/high", "clip_ratio/region"),
        per="tokens",
        epsilon_low=0.2,
        epsilon_high=0.2,
        aggregation="token_mean",
    ),
    "gspo": PolicyLoss(  # GSPO §5.1: ε 3e-4 / 4e-4; the paper's per-completion mean (verl forces it)
        loss=gspo_policy_loss,
        fractions=sequence_clip_fractions,
        shares=("seq_clip_ratio/low", "seq_clip_ratio/high", "seq_clip_ratio/region"),
        per="sequences",
        epsilon_low=3e-4,
        epsilon_high=4e-4,
        aggregation="sequence_mean",
    ),
    "cispo": PolicyLoss(  # MiniMax-M1: no lower bound (1 − 1 = 0 < ρ); 1 + ε_high = 5: TRL's advised ε_max
        loss=cispo_policy_loss,
        fractions=capped_weight_fractions,
        shares=("is_weight_capped/high", "is_weight_capped/low"),
        per="tokens",
        epsilon_low=1.0,
        epsilon_high=4.0,
        aggregation="token_mean",
    ),
}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(π_θ‖π_ref) estimates at tokens y sampled from π_θ, x = log π_ref(y) − log π_θ(y) (N, L):
    k1 = −x; k2 = x²/2; k3 = eˣ − x − 1 (≥ 0; the GRPO paper's). All are 0 where π_θ = π_ref.

    k1 and k3 are unbiased estimates of the value KL(π_θ‖π_ref); k2 is biased (its mean is ≈ KL near
    π_ref). As a loss term the gradient matters, and its expectation over y ~ π_θ (the sample held fixed,
    the gradient through log π_θ only) differs:

    - k1: E[∇(−x)] = E[∇log π_θ(y)] = Σ_y ∇π_θ(y) = 0: no pull towards π_ref at all, only noise.
    - k2: E[−x·∇log π_θ] = Σ_y ∇π_θ(y)·log(π_θ(y)/π_ref(y)) = ∇KL(π_θ‖π_ref), the reverse KL of the value.
    - k3: E[(1 − eˣ)·∇log π_θ] = −Σ_y π_ref(y)·∇log π_θ(y) = ∇KL(π_ref‖π_θ): the forward KL's gradient,
      although the value estimates KL(π_θ‖π_ref).

    k3 is clamped as verl's ``low_var_kl`` and OpenRLHF's ``compute_approx_kl`` do: x to ±20 before eˣ, the
    value to ±10 (no gradient beyond either bound), so one token far from π_ref cannot overflow the loss.
    """
    x = ref_logps - logps
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        x = x.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return (torch.expm1(x) - x).clamp(-K3_VALUE_BOUND, K3_VALUE_BOUND)  # eˣ − 1 − x, accurate for small x
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    kl: str = "k3",
    policy_loss: str = "clip",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GRPO's per-token loss (the negated objective above): (loss (N, L), ratio, KL_t (N, L) or None).

    ``policy_loss`` names a :data:`POLICY_LOSSES` entry: ``clip`` (ratio ρ (N, L)), ``gspo`` (ratio s (N,),
    from the log-ratios over each completion's ``mask`` (N, L); default: every position) or ``cispo`` (ratio
    ρ (N, L)). With β = 0 the KL term is absent and ``ref_logps`` is not needed; with β > 0, β·KL_t is added
    to every token whatever the policy loss. At one update per batch of samples ``old_logps`` is
    ``logps.detach()``: the ratio is 1 exactly and the gradient of each is −Â·∇log π_θ per token, the
    advantage-weighted log-prob gradient (the value is −Â for ``clip`` and ``gspo``, −Â·log π_θ for
    ``cispo``).
    """
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {tuple(POLICY_LOSSES)}, got {policy_loss!r}")
    if mask is None:
        mask = torch.ones_like(logps, dtype=torch.bool)
    loss, ratio = POLICY_LOSSES[policy_loss].loss(
        logps, old_logps, advantages, mask, eps_low=eps_low, eps_high=eps_high
    )
    kl_t = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl_t = kl_penalty(logps, ref_logps, kl)
        loss = loss + beta * kl_t
    return loss, ratio, kl_t
