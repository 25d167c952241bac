"""Preference losses: pure functions over ``(B,)`` tensors returning unreduced losses and detached rewards.

Pair methods are registered in :data:`PAIR_LOSSES` by their config ``method:`` name; the Bradley-Terry
reward-model loss is separate (it takes scores, not log-probs). See docs/methods.md for the index.
"""

from preftune.losses.pairwise import (
    ODPO_OFFSETS,
    LossOutput,
    OffsetDomainError,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    odpo_loss,
    odpo_offset,
    pair_metrics,
    rpo_loss,
    simpo_loss,
)
from preftune.losses.reward_model import bradley_terry_loss

PAIR_LOSSES = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "rpo": rpo_loss,
    "odpo": odpo_loss,
    "simpo": simpo_loss,
}

__all__ = [
    "ODPO_OFFSETS",
    "PAIR_LOSSES",
    "LossOutput",
    "OffsetDomainError",
    "bradley_terry_loss",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "odpo_loss",
    "odpo_offset",
    "pair_metrics",
    "rpo_loss",
    "simpo_loss",
]
