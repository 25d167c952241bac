"""Loss reduction: how per-example or per-token losses become the scalar an optimizer step minimises.

Each function returns one micro-batch's *share* of the step loss: the denominators are counts over the whole
optimizer step (every micro-batch, every process), so summing the shares of a step's micro-batches gives the
step loss, whatever the micro-batch size, accumulation or number of processes.
"""

from __future__ import annotations

import torch


def example_mean(losses: torch.Tensor, n_step_examples: int) -> torch.Tensor:
    """Σ_i ℓ_i / N: ``losses`` (B,) unreduced, N = examples in the whole optimizer step (all micro-batches
    and processes). Batch 4 × accumulation 1 and batch 1 × accumulation 4 give the same step."""
    if n_step_examples < 1:
        raise ValueError(f"n_step_examples must be >= 1, got {n_step_examples}")
    return losses.sum() / n_step_examples


AGGREGATIONS = ("sequence_mean", "token_mean", "constant")


def aggregate(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    n_sequences: int,
    n_tokens: int,
    max_length: int,
) -> torch.Tensor:
    """A micro-batch's share of the step loss from per-token losses ℓ (N, L) and the token mask m (N, L).

    Counts are over the whole optimizer step: G' = ``n_sequences`` completions, ``n_tokens`` = Σ m, and
    L_max = ``max_length`` (the generation limit):

    - ``sequence_mean`` (GRPO paper):  (1/G') · Σ_i (Σ_t m·ℓ) / (Σ_t m)   (a completion without tokens adds 0)
    - ``token_mean`` (DAPO):           Σ_{i,t} m·ℓ / Σ_{i,t} m
    - ``constant`` (Dr. GRPO):         Σ_{i,t} m·ℓ / (G'·L_max)
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if n_sequences < 1 or max_length < 1:
        raise ValueError(f"n_sequences and max_length must be >= 1, got {n_sequences}, {max_length}")
    m = mask.to(token_losses.dtype)
    if mode == "sequence_mean":
        per_sequence = (token_losses * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # (N,)
        return per_sequence.sum() / n_sequences
    if mode == "token_mean":
        return (token_losses * m).sum() / max(n_tokens, 1)
    return (token_losses * m).sum() / (n_sequences * max_length)
