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
