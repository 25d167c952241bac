"""The one log-prob path: log π(y|x) summed over response tokens, in fp32.

The model runs its own forward (so DDP, FSDP and PEFT wrappers see an ordinary call and synchronise
gradients as usual), but a forward pre-hook on its output-embedding module hands the LM head only the
hidden states of response positions: a (M, H) gather before the (H, V) projection, so the (N, T, V) logits
tensor of a plain forward is never built. When even the (M, V) response logits would be large (M·V above
:data:`CHUNKED_ABOVE`, long responses) a plain linear head is not run by the model at all: its input is
captured and a chunked log-softmax (:class:`_ChunkedHeadLogps`, 32 MiB of logits at a time, recomputed in
the backward) gives the log-probs. A head whose logits the model post-processes (scaling, soft-capping)
always runs inside the model on the gathered positions, so whatever the model does still happens. Either way the head runs with autocast off, in its weights' dtype (fp32
master weights under mixed precision), and the log-softmax in fp32. A model
whose forward does not hand the head (N, T, H) hidden states exactly once takes the slow path (a full
forward, then the same gather); both paths are tested against each other.

:func:`shared_prefix_logps` scores several completions of one prompt with the prompt encoded once: one
packed row per prompt and a block attention mask (:func:`preftune.data.pack_shared_prefix`); the head then
gathers, for each completion token, the position that predicts it. It equals the plain path (tested).

Every function takes ``temperature`` T (keyword, default 1): the log-probs and entropy are those of
softmax(z/T), the distribution a sampler at temperature T draws from (online methods train the tempered
policy, as TRL, verl and OpenRLHF do). At T = 1 the logits are not divided at all (bit-identical).

Inputs go to the device of the model's parameters (the one placement rule, :func:`preftune.models.to_device`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data.collate import pack_sequences, pack_shared_prefix
from .models import device_of, unwrap


def _output_head(model) -> torch.nn.Module | None:
    hf = unwrap(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def _head_on_positions(head: torch.nn.Module, source: torch.Tensor, shape: tuple[int, int], device_type: str):
    """While active, ``head`` sees only the hidden states at ``source`` (M,), flat indices into the (N, T)
    positions — (M, H) instead of (N, T, H) — with autocast off and the input in the head's weight dtype;
    it must be called exactly once."""
    autocast_was = torch.is_autocast_enabled(device_type)
    calls: list[int] = []

    def before(module, args):
        hidden = args[0]
        if calls or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(shape):
            raise _NotFast
        calls.append(1)
        picked = hidden.reshape(-1, hidden.shape[-1])[source]  # (M, H)
        # the weight as the forward sees it: under FSDP2 with bf16 the gathered bf16 copy, not the fp32 shard
        weight = getattr(module, "weight", None)
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


# logit post-processing in a model's forward after its head: such heads keep the plain (M, V) logits path
_SPECIAL_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
CHUNK_ELEMENTS = 1 << 23  # logits held at once by the chunked head: 32 MiB of fp32
CHUNKED_ABOVE = 1 << 26  # M·V above which the chunked head is used (256 MiB of fp32 logits); below it the
# plain head + log-softmax is faster (no recomputation in the backward) and its logits are small


def _tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T, and z itself (no division) at T = 1."""
    return z if temperature == 1.0 else z / temperature


class _ChunkedHeadLogps(torch.autograd.Function):
    """log-softmax((h W^T + b)/T)[target] and the entropy, a chunk of rows at a time: the (M, V) logits are
    never held whole, and the backward recomputes each chunk's logits instead of keeping them. Computes in
    fp32, the matmul in the head weight's dtype, with autocast off; the entropy is not differentiated."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature=1.0):
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        logps, lses, entropy = [], [], []
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                z = F.linear(hidden[start : start + rows].to(weight.dtype), weight, bias).float()  # (m, V)
                z = _tempered(z, temperature)
                lse = torch.logsumexp(z, dim=-1)  # (m,)
                t = targets[start : start + rows].unsqueeze(-1)
                logps.append(z.gather(-1, t).squeeze(-1) - lse)
                entropy.append(lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1))  # −Σ p log p
                lses.append(lse)
        cat = torch.cat if hidden.shape[0] else (lambda xs: hidden.new_zeros(0, dtype=torch.float32))
        lse, ent = cat(lses), cat(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return cat(logps), ent

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product, the others added in place (no zero-filled (V, H) buffer)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(weight.dtype)
                z = _tempered(F.linear(h, weight, bias).float(), ctx.temperature)
                g = grad_logps[start : start + rows].float()  # (m,)
                dz = -torch.exp(z - lse[start : start + rows].unsqueeze(-1)) * g.unsqueeze(-1)  # −p·g
                dz.scatter_add_(
                    -1, targets[start : start + rows].unsqueeze(-1), g.unsqueeze(-1)
                )  # + g at target
                dz = _tempered(dz, ctx.temperature)  # d/d(logits) = d/d(logits/T) / T
                if need_h:
                    grad_h[start : start + rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    if grad_w is None:
                        grad_w = dz.t() @ h.float()
                    else:
                        grad_w.addmm_(dz.t(), h.float())
                if need_b:
                    grad_b += dz.sum(dim=0)
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _plain_linear_head(model, head) -> bool:
    config = getattr(unwrap(model), "config", None)
    special = any(getattr(config, key, None) not in (None, 1, 1.0) for key in _SPECIAL_HEAD_KEYS)
    return type(head) is torch.nn.Linear and not special


@contextlib.contextmanager
def _capture_head_input(head: torch.nn.Module, source: torch.Tensor, shape: tuple[int, int]):
    """While active, the head's input at ``source`` is captured (M, H) and the head itself is given no rows,
    so the model computes no logits at all; it must be called exactly once."""
    captured: list[torch.Tensor] = []

    def before(module, args):
        hidden = args[0]
        if captured or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(shape):
            raise _NotFast
        captured.append(hidden.reshape(-1, hidden.shape[-1])[source])  # (M, H), in the autograd graph
        return (hidden[:0, :0],) + tuple(args[1:])  # (0, 0, H): an empty logits tensor

    handle = head.register_forward_pre_hook(before)
    try:
        yield captured
    finally:
        handle.remove()


def _fast_logps(model, source, shape, targets, entropy: bool, temperature: float = 1.0, **inputs):
    """(logps (M,), entropy (M,) or None) of softmax(z/T) at ``source`` with the response-only head, or None
    when the model's forward does not allow it. A plain linear head gets the chunked log-softmax (no (M, V)
    tensor kept); a head with logit post-processing gets its logits at ``source`` (M, V) from the model's own
    forward."""
    from .training.sharding import head_kept

    head = _output_head(model)
    if head is None:
        return None
    try:
        large = source.numel() * head.weight.shape[0] > CHUNKED_ABOVE
        if _plain_linear_head(model, head) and large and entropy != "grad":
            # (sharded: the head's weight stays gathered after the forward for the chunked log-softmax)
            with head_kept(model), _capture_head_input(head, source, shape) as captured:
                model(**inputs, use_cache=False)
                logps, ent = _ChunkedHeadLogps.apply(
                    captured[0], head.weight, head.bias, targets, temperature
                )
            return logps, (ent if entropy else None)
        with _head_on_positions(head, source, shape, source.device.type):
            logits = model(**inputs, use_cache=False).logits
    except _NotFast:
        return None
    if logits.shape[:-1] != source.shape:
        return None  # the model reshaped the head's output
    return _logps_and_entropy(logits, targets, entropy, temperature)


@contextlib.contextmanager
def _tap_head_input(model, wanted: bool):
    """While active (and ``wanted``), the last (N, T, H) input the output head was called with is kept in the
    yielded list, in the autograd graph: the hidden states a value head reads (PPO's critic). Registered
    before the fast path's hooks, so it sees the whole input before they narrow it."""
    store: list[torch.Tensor] = []
    head = _output_head(model) if wanted else None
    if wanted and head is None:
        raise ValueError(
            "the hidden states need a model with an output-embedding module (get_output_embeddings)"
        )

    def before(module, args):
        store[:] = [args[0]]

    handle = head.register_forward_pre_hook(before) if head is not None else None
    try:
        yield store
    finally:
        if handle is not None:
            handle.remove()


def _hidden_at(store: list[torch.Tensor], source: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The tapped hidden states at ``source`` (M,), flat indices into the (N, T) positions: (M, H)."""
    if not store or store[0].dim() != 3 or tuple(store[0].shape[:2]) != tuple(shape):
        raise ValueError("the model's output head was not called once on (N, T, H) hidden states")
    hidden = store[0]
    return hidden.reshape(-1, hidden.shape[-1])[source]


def _response_logps(
    model,
    input_ids,
    attention_mask,
    response_mask,
    fast: bool,
    entropy: bool,
    hidden_out: list | None = None,
    temperature: float = 1.0,
):
    """(logps (M,), rows (M,), entropy (M,) or None) of softmax(z/T) at the response positions, on the
    model's device; with ``hidden_out`` (a list) the hidden states the head read at those positions (M, H)
    are appended (untouched by T)."""
    device = device_of(model)
    input_ids, attention_mask, response_mask = (
        t.to(device) for t in (input_ids, attention_mask, response_mask)
    )
    targets_mask = response_mask[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][targets_mask]  # (M,)
    rows, cols = torch.nonzero(targets_mask, as_tuple=True)  # (M,) each
    n, t = input_ids.shape
    out = None
    source = rows * t + cols
    with _tap_head_input(model, hidden_out is not None) as tapped:
        if fast:
            out = _fast_logps(
                model, source, (n, t), targets, entropy, temperature,
                input_ids=input_ids, attention_mask=attention_mask,
            )  # fmt: skip
        if out is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            out = _logps_and_entropy(logits[:, :-1][targets_mask], targets, entropy, temperature)  # (M, V)
    if hidden_out is not None:
        hidden_out.append(_hidden_at(tapped, source, (n, t)))
    return out[0], rows, out[1]


def _logps_and_entropy(logits: torch.Tensor, targets: torch.Tensor, entropy: bool | str, temperature: float):
    logp_all = torch.log_softmax(_tempered(logits.float(), temperature), dim=-1)  # (M, V) fp32: serves both
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (M,)
    if not entropy:
        return logps, None
    if entropy == "grad":  # differentiated (an entropy bonus): the (M, V) product is kept for the backward
        return logps, -(logp_all.exp() * logp_all).sum(dim=-1)
    rows = max(1, CHUNK_ELEMENTS // max(logp_all.shape[-1], 1))
    with torch.no_grad():  # −Σ_v p_v log p_v, a diagnostic: in chunks, so no (M, V) temporaries
        ent = [-(c.exp() * c).sum(dim=-1) for c in logp_all.detach().split(rows)]
    return logps, torch.cat(ent) if ent else logps.detach().new_zeros(0)


def token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fast: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of response tokens, flattened.

    Args: input_ids, attention_mask (N, T); response_mask (N, T) bool, True where input_ids[:, t] is a
    response token; temperature T: log-probs of softmax(logits / T). Returns (logps (M,) fp32, row (M,)
    long): the log-prob of each response token and the row it belongs to, M = response_mask[:, 1:].sum(),
    row-major. Both on the model's device.
    """
    logps, rows, _ = _response_logps(
        model, input_ids, attention_mask, response_mask, fast, False, temperature=temperature
    )
    return logps, rows


def token_logps_with_entropy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_logps` plus the entropy of π (softmax(logits / T)) at each response position (M,), from
    the same logits (detached: a diagnostic, not part of any loss)."""
    logps, rows, entropy = _response_logps(
        model, input_ids, attention_mask, response_mask, True, True, temperature=temperature
    )
    return logps, rows, entropy


SHARED_PREFIX_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def shared_prefix_logps(
    model,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    *,
    entropy: bool | str = False,
    share: bool = True,
    hidden_out: list | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of every completion of ``groups[i]`` after ``prompts[i]``, the prompt encoded once
    per group (:func:`preftune.data.pack_shared_prefix`): returns (logps (M,), completion (M,), entropy (M,)
    or None), in the order :func:`token_logps` gives for the plain batch of (prompt, completion) rows, and
    equal to it (tested). Models whose attention takes no custom mask, and ``share=False``
    (``training.share_prefix``), get exactly that plain batch. ``entropy="grad"`` gives an entropy that is
    differentiated (a loss term, never the chunked head); ``True`` a detached diagnostic. With ``hidden_out`` (a list), the hidden states
    the head read at the same positions (M, H) are appended to it (PPO's value head reads them; T does not
    touch them). ``temperature`` T: log-probs and entropy of softmax(logits / T)."""
    device = device_of(model)
    implementation = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    if share and implementation in SHARED_PREFIX_ATTENTION:
        packed = {k: v.to(device) for k, v in pack_shared_prefix(prompts, groups, pad_token_id).items()}
        allowed = packed["allowed"].unsqueeze(1)  # (B, 1, T, T)
        if implementation == "eager":  # additive mask
            dtype = next(model.parameters()).dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        shape = tuple(packed["input_ids"].shape)
        with _tap_head_input(model, hidden_out is not None) as tapped:
            out = _fast_logps(
                model, packed["source"], shape, packed["targets"], entropy, temperature,
                input_ids=packed["input_ids"], attention_mask=allowed, position_ids=packed["position_ids"],
            )  # fmt: skip
        if out is not None:
            if hidden_out is not None:
                hidden_out.append(_hidden_at(tapped, packed["source"], shape))
            return out[0], packed["completion"], out[1]
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    batch = pack_sequences(flat_prompts, [c for group in groups for c in group], pad_token_id)
    return _response_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], True, entropy, hidden_out,
        temperature,
    )  # fmt: skip


def pair_sequence_logps(
    model,
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    share_prefix: bool = True,
) -> torch.Tensor:
    """log π(y|x) of B pairs, (2B,) fp32 ordered [chosen 0..B-1, rejected 0..B-1] (the order of
    :func:`preftune.data.collate_pairs`). With ``share_prefix`` each prompt is encoded once for both of its
    responses (:func:`shared_prefix_logps`); else the plain batch of 2B (prompt, response) rows."""
    n = len(prompts)
    groups = [[c, r] for c, r in zip(chosen, rejected)]
    flat, completion, _ = shared_prefix_logps(model, prompts, groups, pad_token_id, share=share_prefix)
    sums = torch.zeros(2 * n, dtype=torch.float32, device=flat.device).index_add(0, completion, flat)  # (2B,)
    return sums.view(n, 2).T.reshape(-1)  # [c0, r0, c1, r1, ...] -> [c0, c1, ..., r0, r1, ...]


def sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fast: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) = Σ_t log π(y_t|x, y_<t) over response tokens (π = softmax(logits / T)): returns (sums (N,)
    fp32, lengths (N,) long).

    A row whose response was truncated away has sum 0 and length 0; callers that average clamp the length.
    """
    logps, rows = token_logps(
        model, input_ids, attention_mask, response_mask, fast=fast, temperature=temperature
    )
    n = input_ids.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(0, rows, logps)  # (N,)
    lengths = response_mask[:, 1:].sum(dim=1).to(logps.device)  # (N,)
    return sums, lengths


@torch.inference_mode()
def score_groups(
    model,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) and |y| of every completion of ``groups[i]`` after ``prompts[i]``, each prompt encoded once
    for its group (:func:`shared_prefix_logps`); groups of about ``batch_size`` completions at a time, shortest
    first (less padding); π = softmax(z/T) at ``temperature`` T. Returns (sums (C,) fp32, lengths (C,) long)
    on CPU, completions in input order."""
    first = [0]  # each group's first completion in the flat output
    for group in groups:
        first.append(first[-1] + len(group))
    sums = torch.zeros(first[-1], dtype=torch.float32)
    lengths = torch.tensor([len(c) for group in groups for c in group], dtype=torch.long)
    order = sorted(range(len(groups)), key=lambda g: len(prompts[g]) + sum(len(c) for c in groups[g]))
    chunk: list[int] = []
    for pos, g in enumerate(order):
        chunk.append(g)
        size = sum(len(groups[k]) for k in chunk)
        if size < batch_size and pos < len(order) - 1:
            continue
        chunk_groups = [groups[k] for k in chunk]
        logps, completion, _ = shared_prefix_logps(
            model, [prompts[k] for k in chunk], chunk_groups, pad_token_id, temperature=temperature
        )
        owners = [i for k in chunk for i in range(first[k], first[k + 1])]
        local = torch.zeros(len(owners), dtype=torch.float32, device=logps.device).index_add(
            0, completion, logps
        )
        sums[torch.tensor(owners)] = local.float().cpu()
        chunk = []
    return sums, lengths


def score_responses(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) and |y| for many (prompt ids, response ids) pairs, batched; on CPU, in input order."""
    return score_groups(
        model, prompts, [[r] for r in responses], pad_token_id=pad_token_id, batch_size=batch_size
    )
