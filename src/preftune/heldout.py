"""Held-out evaluation of a policy, one implementation for online training's eval rows and the experiment.

Per prompt, ``k`` completions sampled from the policy at the generation settings (:func:`sample_groups`, a
fixed seed, so every evaluation of a run sees the same random draws); the caller scores them with its reward.
:func:`log_ratios` gives each sample's log π_θ(y|x) − log π_ref(y|x), both at the sampling temperature T
(softmax(z/T), the distribution the samples come from), each prompt encoded once for its completions. When the
policy computes in fp32, its term is the sampler's own log-prob of the sample (:func:`sampler_logps_exact`):
in fp32 a re-scoring pass gives the same numbers to ~1e-7 per token, so it would only repeat a forward pass.
:func:`summary` turns rewards and log-ratios into the reported numbers: mean reward and the sequence
KL(π_θ‖π_ref), each ± a standard error clustered by prompt (the k samples of one prompt are not independent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import metrics as M
from .config import GenerationConfig
from .logprobs import score_groups
from .sampling import sample_ids_and_logps, sequence_logps_of


def sample_groups(
    model, prompt_ids: Sequence[Sequence[int]], k: int, gen: GenerationConfig, *, eos_id, pad_id: int, seed: int,
    progress: bool = False,
) -> tuple[list[list[list[int]]], list[list[float]]]:  # fmt: skip
    """``k`` completions (token ids) of each prompt from ``model`` at ``gen``'s settings, and each one's
    log-prob under the sampler (same nesting); completion j of prompt i uses ``derive_seed(seed, i, j)``. KL
    from these samples needs ``gen.top_p == 1``."""
    if gen.top_p != 1:
        raise ValueError(
            f"a KL estimate from samples needs top_p 1 (got {gen.top_p}): no reading at top_p < 1"
        )
    groups, token_logps = sample_ids_and_logps(
        model, prompt_ids, k, gen, eos_id=eos_id, pad_id=pad_id, seed=seed, progress=progress
    )
    return groups, sequence_logps_of(token_logps)


def sampler_logps_exact(model, mixed_precision: str) -> bool:
    """Whether the sampler's log-probs can stand for a scoring pass of ``model``: fp32 weights and no
    autocast. Under bf16 the incremental decode and a full forward round differently (~2e-3 per token), and
    the reference's pass is a full forward, so the policy is re-scored the same way."""
    return mixed_precision not in ("bf16", "fp16") and next(model.parameters()).dtype == torch.float32


def log_ratios(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int,
    batch_size: int,
    temperature: float,
    sampled_logps: Sequence[Sequence[float]] | None = None,
    mixed_precision: str = "no",
) -> list[float]:
    """log π_θ(y|x) − log π_ref(y|x) of every completion, flat in prompt order (prompt 0's k, then prompt
    1's, ...), both at ``temperature`` (T = 0, greedy samples, is taken at 1: the argmax has no density).

    ``policy`` is a model (run without gradients, its mode restored); ``reference`` a
    :class:`preftune.training.reference.Reference` (adapters off, a frozen copy, or the base model itself).
    ``sampled_logps`` (nested like ``groups``): each completion's log-prob under the sampler
    (:func:`sample_groups`); it stands for the policy's pass when :func:`sampler_logps_exact` says so for
    ``policy`` under ``mixed_precision`` (the autocast the samples were drawn in), else the policy is re-scored."""
    t = temperature or 1.0
    if sampled_logps is not None and [len(g) for g in sampled_logps] != [len(g) for g in groups]:
        raise ValueError(
            f"sampled_logps are nested {[len(g) for g in sampled_logps]}, the completions {[len(g) for g in groups]}"
        )
    if sampled_logps is not None and sampler_logps_exact(policy, mixed_precision):
        mine = torch.tensor([lp for group in sampled_logps for lp in group], dtype=torch.float64)
    else:
        with torch.no_grad():
            was_training = policy.training
            policy.eval()
            try:
                mine, _ = score_groups(
                    policy,
                    prompt_ids,
                    groups,
                    pad_token_id=pad_token_id,
                    batch_size=batch_size,
                    temperature=t,
                )
            finally:
                policy.train(was_training)
    ref = reference.score_groups(
        prompt_ids, groups, pad_token_id=pad_token_id, batch_size=batch_size, temperature=t
    )
    return (mine.double() - ref.double()).tolist()


def clusters_of(groups: Sequence[Sequence]) -> list[int]:
    """The prompt index of every flat completion: the standard errors' clusters."""
    return [i for i, group in enumerate(groups) for _ in group]


def summary(rewards: Sequence[float | None], clusters: Sequence[int], ratios: Sequence[float] | None) -> dict:
    """``reward`` ± ``reward_se`` over the samples that got one (None = no reward) and ``kl`` ± ``kl_se`` from
    the log-ratios (``ratios`` None: the policy is π_ref, KL 0), standard errors clustered by prompt."""
    out: dict[str, float] = {}
    scored = [(r, c) for r, c in zip(rewards, clusters) if r is not None]
    if scored:
        out["reward"], out["reward_se"] = M.mean_and_se([r for r, _ in scored], [c for _, c in scored])
    if ratios is None:
        out["kl"], out["kl_se"] = 0.0, 0.0
    else:
        out["kl"], out["kl_se"] = M.mean_and_se(ratios, clusters)
    return out


__all__ = ["clusters_of", "log_ratios", "sample_groups", "sampler_logps_exact", "summary"]
