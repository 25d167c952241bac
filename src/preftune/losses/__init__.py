"""Preference losses: pure functions over ``(B,)`` tensors returning unreduced losses and detached rewards.

Pair methods are registered in :data:`PAIR_METHODS` by their config ``method:`` name, each with the named
inputs its loss takes (which also says whether it needs a reference model); the Bradley-Terry reward-model
loss is separate (it takes scores, not log-probs); ``kto`` holds the unpaired methods (:data:`UNPAIRED_METHODS`:
KTO's per-record loss and its reference point); ``policy_gradient`` holds the online methods' pieces
(group advantages, the policy losses :data:`POLICY_LOSSES`, KL estimators) and ``ppo`` PPO's (KL-shaped
rewards, GAE, whitening, the clipped value loss, the adaptive KL coefficient); ``reduction`` turns unreduced
per-example or per-token losses into a step's loss.
See docs/methods.md for the index.
"""

from preftune.losses.kto import UNPAIRED_METHODS, kto_loss, kto_reference_point
from preftune.losses.pairwise import (
    ODPO_OFFSETS,
    ONLINE_DPO_LOSSES,
    PAIR_METHODS,
    LossOutput,
    OffsetDomainError,
    PairMethod,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    odpo_loss,
    odpo_offset,
    orpo_loss,
    pair_metrics,
    rpo_loss,
    simpo_loss,
)
from preftune.losses.policy_gradient import (
    BASELINES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    SCALES,
    PolicyLoss,
    capped_weight_fractions,
    cispo_policy_loss,
    clip_fractions,
    clipped_policy_loss,
    group_advantages,
    grpo_token_loss,
    gspo_policy_loss,
    kl_penalty,
    sequence_clip_fractions,
    zero_spread_fraction,
    zero_spread_groups,
)
from preftune.losses.ppo import (
    PPO_KL_ESTIMATORS,
    adaptive_kl_coef,
    approx_kl,
    clipped_value_loss,
    explained_variance,
    explained_variance_from_sums,
    gae,
    kl_shaped_rewards,
    masked_mean_var,
    mean_var_from_sums,
    whiten,
)
from preftune.losses.reduction import AGGREGATIONS, aggregate, example_mean
from preftune.losses.reward_model import bradley_terry_loss

PAIR_LOSSES = {name: method.loss for name, method in PAIR_METHODS.items()}

__all__ = [
    "AGGREGATIONS",
    "BASELINES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "SCALES",
    "PolicyLoss",
    "aggregate",
    "capped_weight_fractions",
    "cispo_policy_loss",
    "clip_fractions",
    "clipped_policy_loss",
    "group_advantages",
    "gspo_policy_loss",
    "grpo_token_loss",
    "kl_penalty",
    "sequence_clip_fractions",
    "zero_spread_fraction",
    "zero_spread_groups",
    "PPO_KL_ESTIMATORS",
    "adaptive_kl_coef",
    "approx_kl",
    "clipped_value_loss",
    "explained_variance",
    "explained_variance_from_sums",
    "gae",
    "kl_shaped_rewards",
    "masked_mean_var",
    "mean_var_from_sums",
    "whiten",
    "ODPO_OFFSETS",
    "ONLINE_DPO_LOSSES",
    "PAIR_LOSSES",
    "PAIR_METHODS",
    "LossOutput",
    "OffsetDomainError",
    "PairMethod",
    "bradley_terry_loss",
    "dpo_loss",
    "example_mean",
    "hinge_loss",
    "kto_loss",
    "kto_reference_point",
    "UNPAIRED_METHODS",
    "ipo_loss",
    "odpo_loss",
    "odpo_offset",
    "orpo_loss",
    "pair_metrics",
    "rpo_loss",
    "simpo_loss",
]
