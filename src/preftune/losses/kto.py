"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): the unpaired loss and its reference point, pure functions.

A record is (x, y, desirable?). With r = log pi_theta(y|x) - log pi_ref(y|x) (SUMMED over the completion's
tokens) and the reference point z0 (the KL term, Eq. 8's estimate, see :func:`kto_reference_point`):

    desirable:    loss = lambda_D * (1 - sigma(beta * (r - z0)))        (Eq. 7, v(x, y) for y desirable)
    undesirable:  loss = lambda_U * (1 - sigma(beta * (z0 - r)))        (Eq. 7, for y undesirable)

i.e. lambda_y - v(x, y) with the paper's value function v. 1 - sigma(t) is computed as sigma(-t). At the first
step pi_theta = pi_ref, r = 0 and z0 = max(0, 0) = 0, so every record's loss is lambda / 2.

z0 is detached (no gradient flows through the reference point, as in the paper and TRL) and clamped at 0.
Where we depart from TRL (also in docs/methods.md): TRL averages the per-process means of the mismatched
log-ratios (a mean of means); we divide their sum over processes by their count over processes, so an
uneven last batch weighs every mismatched pair once. The loss formula itself equals TRL's ``kto`` loss_type
(``KTOTrainer``: ``1 - F.sigmoid(beta * (chosen_logratios - kl))`` and ``1 - F.sigmoid(beta * (kl -
rejected_logratios))``, weighted by ``desirable_weight`` / ``undesirable_weight``).
"""

from __future__ import annotations

import torch

from preftune.losses.pairwise import LossOutput


def kto_reference_point(kl_sum: torch.Tensor | float, kl_count: torch.Tensor | float) -> torch.Tensor:
    """z0 = max(0, kl_sum / kl_count), detached, a 0-dim float tensor.

    ``kl_sum`` is the sum over the mismatched (x_i, y_j) pairs of log pi_theta(y_j|x_i) - log pi_ref(y_j|x_i)
    (summed over processes), ``kl_count`` their number (summed over processes); a count of 0 gives z0 = 0.
    Example: sums 3.0 and -1.0 over 2 + 2 pairs -> z0 = max(0, 2.0 / 4) = 0.5; a mean of -0.5 -> z0 = 0.
    """
    kl_sum = torch.as_tensor(kl_sum, dtype=torch.float64).detach()
    kl_count = torch.as_tensor(kl_count, dtype=torch.float64).detach()
    return (kl_sum / kl_count.clamp(min=1.0)).clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO's per-record loss: ``policy_logps``, ``ref_logps`` (B,) summed completion log-probs, ``labels`` (B,)
    bool (True = desirable), ``reference_point`` z0 (0-dim, from :func:`kto_reference_point`; detached here
    again). Returns the unreduced (B,) losses; ``chosen_rewards`` / ``rejected_rewards`` hold beta * r of the
    desirable / undesirable records (TRL's rewards/chosen, rewards/rejected), each (B_D,) / (B_U,).

    Hand values (beta = 0.1, unit weights, z0 = 0.5): a desirable record with r = 2.5 has
    1 - sigma(0.1 * 2.0) = 1 - 0.549834 = 0.450166; an undesirable one with r = -1.5 has
    1 - sigma(0.1 * 2.0) = 0.450166 too; with undesirable_weight 2 the latter is 0.900332.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    shapes = {tuple(policy_logps.shape), tuple(ref_logps.shape), tuple(labels.shape)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"kto_loss inputs must all be (B,) tensors of one shape, got {sorted(shapes)}")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    pi, ref = policy_logps.to(dtype), ref_logps.to(dtype)
    desirable = labels.to(device=pi.device, dtype=torch.bool)  # (B,)
    z0 = torch.as_tensor(reference_point, device=pi.device).detach().to(dtype)  # ()
    r = pi - ref  # log pi_theta(y|x) - log pi_ref(y|x)   (B,)
    # 1 - sigma(t) = sigma(-t): desirable t = beta (r - z0), undesirable t = beta (z0 - r)
    t = torch.where(desirable, beta * (r - z0), beta * (z0 - r))  # (B,)
    weight = torch.where(
        desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight)
    )  # (B,)
    losses = weight * torch.sigmoid(-t)  # (B,)
    rewards = beta * r.detach()  # (B,)
    return LossOutput(losses, chosen_rewards=rewards[desirable], rejected_rewards=rewards[~desirable])


# the unpaired methods, by their config ``method:`` name
UNPAIRED_METHODS = {"kto": kto_loss}
