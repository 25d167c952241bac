"""The one log-prob path: log π(y|x) summed over response tokens, in fp32.

The model runs its own forward (so DDP, FSDP and PEFT wrappers see an ordinary call and synchronise
gradients as usual), but a forward pre-hook on its output-embedding module hands the LM head only the
hidden states of response positions: a (M, H) gather before the (H, V) projection, so the (N, T, V) logits
tensor of a plain forward is never built. Whatever the model does to its hidden states before the head, and
element-wise to the logits after it (scaling, soft-capping), still happens. The head runs with autocast off,
in its weights' dtype (fp32 master weights under mixed precision), and the log-softmax in fp32. A model
whose forward does not hand the head (N, T, H) hidden states exactly once takes the slow path (a full
forward, then the same gather); both paths are tested against each other.

Inputs go to the device of the model's parameters (the one placement rule, :func:`preftune.models.to_device`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data.collate import pack_sequences
from .models import device_of, unwrap


def _output_head(model) -> torch.nn.Module | None:
    hf = unwrap(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def _head_on_positions(head: torch.nn.Module, positions: torch.Tensor, device_type: str):
    """While active, ``head`` sees hidden[:, :-1][positions] (M, H) instead of hidden (N, T, H), with
    autocast off and the input in the head's weight dtype; it must be called exactly once."""
    autocast_was = torch.is_autocast_enabled(device_type)
    weight = getattr(head, "weight", None)
    calls: list[int] = []

    def before(module, args):
        hidden = args[0]
        if calls or hidden.dim() != 3 or hidden.shape[:2] != positions.shape[:1] + (positions.shape[1] + 1,):
            raise _NotFast
        calls.append(1)
        picked = hidden[:, :-1][positions]  # (M, H)
        torch.set_autocast_enabled(device_type, False)
        return (picked.to(weight.dtype) if isinstance(weight, torch.Tensor) else picked,) + tuple(args[1:])

    def after(module, args, output):
        torch.set_autocast_enabled(device_type, autocast_was)

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        torch.set_autocast_enabled(device_type, autocast_was)


class _NotFast(Exception):
    """The model's forward does not fit the response-only head; use the full forward."""


def _response_logits(model, input_ids, attention_mask, response_mask, fast: bool):
    """(logits (M, V), targets (M,), rows (M,)) at the response positions, on the model's device."""
    device = device_of(model)
    input_ids, attention_mask, response_mask = (
        t.to(device) for t in (input_ids, attention_mask, response_mask)
    )
    targets_mask = response_mask[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][targets_mask]  # (M,)
    rows = torch.nonzero(targets_mask, as_tuple=True)[0]  # (M,)
    head = _output_head(model) if fast else None
    logits = None
    if head is not None:
        try:
            with _head_on_positions(head, targets_mask, device.type):
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        except _NotFast:
            logits = None
        if logits is not None and logits.shape[:-1] != targets.shape:
            logits = None  # the model reshaped the head's output: not a per-position head
    if logits is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1][targets_mask]  # (M, V)
    return logits, targets, rows


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
    the row it belongs to, M = response_mask[:, 1:].sum(), row-major. Both on the model's device.
    """
    logits, targets, rows = _response_logits(model, input_ids, attention_mask, response_mask, fast)
    logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (M,) = log_softmax(logits)[targets]
    return logps, rows


def token_logps_with_entropy(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_logps` plus the entropy of π at each response position, −Σ_v p_v log p_v (M,), from the
    same logits (detached: a diagnostic, not part of any loss)."""
    logits, targets, rows = _response_logits(model, input_ids, attention_mask, response_mask, True)
    logits = logits.float()
    logps = -F.cross_entropy(logits, targets, reduction="none")  # (M,)
    with torch.no_grad():
        logp_all = torch.log_softmax(logits.detach(), dim=-1)  # (M, V)
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (M,)
    return logps, rows, entropy


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
    lengths = response_mask[:, 1:].sum(dim=1).to(logps.device)  # (N,)
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
    sums, lengths = [], []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pack_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_token_id)
        s, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        sums.append(s.cpu())
        lengths.append(n.cpu())
    out_s = torch.empty(len(prompts), dtype=torch.float32)
    out_n = torch.empty(len(prompts), dtype=torch.long)
    out_s[torch.tensor(order)] = torch.cat(sums)
    out_n[torch.tensor(order)] = torch.cat(lengths)
    return out_s, out_n
