"""Preference losses: pure functions over ``(B,)`` tensors returning unreduced losses and detached rewards.

Pair methods are registered in :data:`PAIR_METHODS` by their config ``method:`` name, each with the named
inputs its loss takes (which also says whether it needs a reference model); the Bradley-Terry reward-model
loss is separate (it takes scores, not log-probs); ``reduction`` turns unreduced losses into a step's loss.
See docs/methods.md for the index.
"""

from preftune.losses.pairwise import (
    ODPO_OFFSETS,
    PAIR_METHODS,
    LossOutput,
    OffsetDomainError,
    PairMethod,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    odpo_loss,
    odpo_offset,
    pair_metrics,
    rpo_loss,
    simpo_loss,
)
from preftune.losses.reduction import example_mean
from preftune.losses.reward_model import bradley_terry_loss

PAIR_LOSSES = {name: method.loss for name, method in PAIR_METHODS.items()}

__all__ = [
    "ODPO_OFFSETS",
    "PAIR_LOSSES",
    "PAIR_METHODS",
    "LossOutput",
    "OffsetDomainError",
    "PairMethod",
    "bradley_terry_loss",
    "dpo_loss",
    "example_mean",
    "hinge_loss",
    "ipo_loss",
    "odpo_loss",
    "odpo_offset",
    "pair_metrics",
    "rpo_loss",
    "simpo_loss",
]
