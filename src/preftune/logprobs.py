"""The one log-prob path: log π(y|x) summed over response tokens, in fp32.

The backbone runs on the whole sequence, but the LM head and the log-softmax run on response positions
only (a (M, H) gather before the (H, V) projection), so the (N, T, V) logits tensor of a plain forward is
never built. Models whose head is not a plain projection of the last hidden state (logit soft-capping,
logit scaling) take the slow path: a full forward, then the same gather. Both paths are tested against
each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.collate import pack_sequences
from .models import unwrap

_SPECIAL_HEAD_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier_scale",
)


def _fast_parts(model):
    hf = unwrap(model)
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    config = getattr(hf, "config", None)
    if backbone is None or head is None or config is None:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _SPECIAL_HEAD_KEYS):
        return None
    return backbone, head


def _project(head, hidden: torch.Tensor) -> torch.Tensor:
    """(M, H) hidden -> (M, V) fp32 logits."""
    if type(head) is torch.nn.Linear:
        bias = None if head.bias is None else head.bias.float()
        return F.linear(hidden.float(), head.weight.float(), bias)
    return head(hidden).float()


def token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of response tokens, flattened.

    Args: input_ids, attention_mask (N, T); response_mask (N, T) bool, True where input_ids[:, t] is a
    response token. Returns (logps (M,) fp32, row (M,) long): the log-prob of each response token and
    the row it belongs to, M = response_mask[:, 1:].sum().
    """
    targets_mask = response_mask[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][targets_mask]  # (M,)
    rows = torch.nonzero(targets_mask, as_tuple=True)[0]  # (M,)
    parts = _fast_parts(model) if fast else None
    if parts is not None:
        backbone, head = parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        logits = _project(head, hidden[:, :-1][targets_mask])  # (M, V) fp32
    else:
        logits = (
            model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][targets_mask].float()
        )
    logps = -F.cross_entropy(logits, targets, reduction="none")  # (M,) = log_softmax(logits)[targets]
    return logps, rows


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) = Σ_t log π(y_t|x, y_<t) over response tokens: returns (sums (N,) fp32, lengths (N,) long).

    A row whose response was truncated away has sum 0 and length 0; callers that average clamp the length.
    """
    logps, rows = token_logps(model, input_ids, attention_mask, response_mask, fast=fast)
    n = input_ids.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(0, rows, logps)  # (N,)
    lengths = response_mask[:, 1:].sum(dim=1)  # (N,)
    return sums, lengths


@torch.inference_mode()
def score_responses(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) and |y| for many (prompt ids, response ids) pairs, batched; on CPU, in input order."""
    device = next(model.parameters()).device
    sums, lengths = [], []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pack_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_token_id)
        s, n = sequence_logps(
            model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
        )
        sums.append(s.cpu())
        lengths.append(n.cpu())
    out_s = torch.empty(len(prompts), dtype=torch.float32)
    out_n = torch.empty(len(prompts), dtype=torch.long)
    out_s[torch.tensor(order)] = torch.cat(sums)
    out_n[torch.tensor(order)] = torch.cat(lengths)
    return out_s, out_n
