"""The tied input embedding's gradient added by index into the weight's gradient, not built densely.

A causal LM whose LM head is tied to its input embedding (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B, Gemma...)
gets two gradients for that one (V, H) weight: the head's, dense (every vocabulary row), and the
embedding lookup's, which touches only the rows of the batch's tokens. PyTorch's embedding backward still
builds the second one densely (a fresh V × H buffer, zero-filled, then the rows added) and autograd then adds
the two V × H tensors: on the embedded model (49152 × 576, 113 MB) that is ~19% of a short-prompt DPO step
on a 2-core CPU (docs/benchmarks.md). Here the lookup's backward adds its rows straight into the weight's
``.grad`` (``index_add_``), after autograd has put the head's gradient there, so neither buffer exists.

Why the order holds: the lookup is called with a zero-size ``anchor`` that requires grad in place of the
weight, so the weight's gradient accumulator has one producer only (the head) and runs as soon as the head's
backward is done — long before the lookup's backward, which waits for every decoder layer's. Should it run
later all the same, the result is unchanged: the lookup then creates the zero ``.grad`` it adds into, and the
accumulator adds the head's gradient in place. Rows of ``padding_idx`` get no gradient, as in
``nn.Embedding``.

Only where nothing else reads the gradient as autograd produces it: one process, or FSDP2 (the embedding and
head are in the root unit, whose gradients FSDP2 reduce-scatters in its callback at the end of the backward,
after the lookup's rows are added; the rows go into the gathered weight's ``.grad``), not DDP (its hooks
all-reduce a gradient when its accumulator runs, before the lookup's rows are added); a plain ``nn.Embedding``
without ``max_norm``, ``scale_grad_by_freq`` or ``sparse``, tied to the head, trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LookupIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, ids, module):
        # the module, not its weight, is the argument: a tensor argument would make this node a producer of
        # the weight's gradient, and its accumulator would wait for this backward
        ctx.save_for_backward(ids)
        ctx.module = module
        return F.embedding(ids, module.weight.detach())

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight, padding_idx = ctx.module.weight, ctx.module.padding_idx
        rows = ids.reshape(-1)
        grads = grad_out.reshape(-1, grad_out.shape[-1])
        if padding_idx is not None:
            keep = rows != padding_idx
            rows, grads = rows[keep], grads[keep]
        if weight.dtype != torch.float32:  # bf16 (FSDP2's gathered copy): sum a row's repeats in fp32 first,
            # as the dense backward does, so each row is rounded once (and CUDA's bf16 atomics never collide)
            rows, where = torch.unique(rows, return_inverse=True)
            summed = grads.new_zeros((len(rows), grads.shape[-1]), dtype=torch.float32)
            grads = summed.index_add_(0, where, grads.float())
        with torch.no_grad():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, rows, grads.to(weight.dtype))
        return None, None, None


class IndexGradEmbedding(torch.nn.Embedding):
    """``nn.Embedding`` whose weight gradient is added by index into ``weight.grad`` while training (see the
    module docstring); a plain lookup otherwise (no grad, or a frozen weight)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(input)
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)
        return _LookupIntoGrad.apply(anchor, input, self)


def use_index_grad_embedding(model: torch.nn.Module) -> bool:
    """Switch ``model``'s input embedding to :class:`IndexGradEmbedding` where that is exact (see the module
    docstring; the caller checks one process or FSDP2, no DDP). Returns whether it did."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    plain = type(emb) is torch.nn.Embedding or type(emb) is IndexGradEmbedding
    if not plain or head is None or getattr(head, "weight", None) is not emb.weight:
        return False
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse or not emb.weight.requires_grad:
        return False
    emb.__class__ = IndexGradEmbedding
    return True


__all__ = ["IndexGradEmbedding", "use_index_grad_embedding"]
