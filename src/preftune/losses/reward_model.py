"""Bradley-Terry reward-model loss (a pure function over the scalar scores of the two responses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.pairwise import LossOutput, _as_float


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> LossOutput:
    """Bradley-Terry reward-model loss (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155; the per-pair
    margin m as in Llama 2, Touvron et al. 2023, arXiv 2307.09288): loss = -log sigma(r_w - r_l - m).

    ``chosen_scores`` r_w, ``rejected_scores`` r_l and ``margin`` m (None: m = 0) are ``(B,)``; losses ``(B,)``.
    The rewards in the output are the scores themselves, detached.
    """
    r_w, r_l = _as_float(chosen_scores, rejected_scores)
    m = torch.zeros_like(r_w) if margin is None else _as_float(margin, r_w)[0]  # (B,)
    losses = -F.logsigmoid(r_w - r_l - m)  # -log sigma(r_w - r_l - m)
    return LossOutput(losses, r_w.detach(), r_l.detach())
