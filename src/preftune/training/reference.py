"""The reference model π_ref, in one place: who computes its log-probs, and the precomputed pair log-probs.

π_ref is the starting model. It takes one of three forms, chosen by :func:`build_reference`:

- ``"adapters_off"``: under LoRA, the policy itself with its adapters disabled — no second copy;
- ``"copy"``: under full fine-tuning, when π_ref must run while the policy trains (on-the-fly reference for
  pairs, the KL term of online methods), a frozen copy of the starting weights;
- ``"initial"``: under full fine-tuning, before the first optimizer step, the policy itself. Used to
  precompute the reference log-probs of fixed pairs once, so full fine-tuning of a pair method needs no
  second copy at all.

Every form runs without gradients and in eval mode, on the device of the model it runs.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..config import METHOD_SECTIONS, TrainConfig
from ..data import PairExample
from ..files import save_safetensors_atomic
from ..logprobs import pair_sequence_logps, score_groups, sequence_logps, shared_prefix_logps, token_logps
from ..models import is_peft, load_model, unwrap_model
from .sharding import is_sharded, shard_like

KINDS = ("adapters_off", "copy", "initial")


def uses_reference(cfg: TrainConfig) -> bool:
    """Whether the method of ``cfg`` uses π_ref at all: the method's section says (the one place this is
    decided); a method the registry does not know is an error, not a silent "no"."""
    if cfg.method not in METHOD_SECTIONS or not isinstance(cfg.method_config, METHOD_SECTIONS[cfg.method]):
        raise ValueError(f"unknown method {cfg.method!r}: not one of {', '.join(METHOD_SECTIONS)}")
    return cfg.method_config.uses_reference()


def precomputes_reference(cfg: TrainConfig) -> bool:
    """Whether π_ref's log-probs are computed once before training (pair methods, ``training.precompute_ref``)
    rather than by a reference that runs on every batch. Never for a streamed run: that would need every
    record before step 1."""
    return (
        uses_reference(cfg)
        and cfg.method_config.kind == "pair"
        and cfg.training.precompute_ref
        and not cfg.data.streaming
    )


def setup_reference(policy, cfg: TrainConfig, model_path: str, *, policy_trained: bool) -> Reference:
    """π_ref for a run whose reference runs while the policy trains (pair methods without precomputed
    log-probs, KTO, online methods at β > 0, the online evaluator): adapters off under LoRA, else a frozen
    fp32 copy — of the policy as it is, or, once ``policy_trained`` (resumed, or evaluated after steps), of the
    starting weights read again from ``model_path``. The one way every trainer and evaluator builds it."""

    def load_copy():
        return load_model(model_path, trust_remote_code=cfg.model.trust_remote_code)

    # a sharded policy cannot be deep-copied: its copy is read again from model_path and sharded alike
    fresh = policy_trained or is_sharded(policy)
    return build_reference(policy, during_training=True, load_copy=load_copy if fresh else None)


class Reference:
    """π_ref's log-probs for batches in the log-prob path's format (see :mod:`preftune.logprobs`)."""

    def __init__(self, policy, kind: str, frozen=None):
        if kind not in KINDS:
            raise ValueError(f"reference kind must be one of {KINDS}, got {kind!r}")
        if (kind == "copy") != (frozen is not None):
            raise ValueError("a frozen model is given exactly for kind 'copy'")
        if kind == "adapters_off" and not is_peft(policy):
            raise ValueError("reference 'adapters_off' needs a LoRA (PEFT) policy")
        self.policy = policy
        self.kind = kind
        self.frozen = frozen

    @contextlib.contextmanager
    def _model(self) -> Iterator[torch.nn.Module]:
        model = self.frozen if self.kind == "copy" else self.policy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.kind == "adapters_off":
                    with unwrap_model(self.policy).disable_adapter():
                        yield model
                else:
                    yield model
        finally:
            model.train(was_training)

    def token_logps(
        self, input_ids, attention_mask, response_mask, *, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π_ref of the response tokens: (logps (M,), rows (M,)), as ``logprobs.token_logps``
        (π_ref = softmax(z/T) at ``temperature`` T, as the policy it is compared with)."""
        with self._model() as model:
            return token_logps(model, input_ids, attention_mask, response_mask, temperature=temperature)

    def shared_prefix_logps(
        self, prompts, groups, pad_token_id: int, share: bool = True, *, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π_ref of each group's completions, the prompt encoded once (``logprobs``), at
        ``temperature``."""
        with self._model() as model:
            logps, completion, _ = shared_prefix_logps(
                model, prompts, groups, pad_token_id, share=share, temperature=temperature
            )
            return logps, completion

    def score_groups(
        self, prompts, groups, *, pad_token_id: int, batch_size: int, temperature: float = 1.0
    ) -> torch.Tensor:
        """(C,) log π_ref(y|x) of every completion of ``groups[i]`` after ``prompts[i]``, flat, on the CPU
        (:func:`preftune.logprobs.score_groups`), at ``temperature``."""
        with self._model() as model:
            return score_groups(
                model,
                prompts,
                groups,
                pad_token_id=pad_token_id,
                batch_size=batch_size,
                temperature=temperature,
            )[0]

    def pair_logps(self, pairs: Sequence[PairExample], pad_token_id: int, share_prefix: bool) -> torch.Tensor:
        """(2B,) log π_ref of B pairs, [chosen..., rejected...] (see :func:`pair_logps`)."""
        with self._model() as model:
            return pair_logps(model, pairs, pad_token_id, share_prefix)

    def completion_logps(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        pad_token_id: int,
        share: bool,
    ) -> torch.Tensor:
        """(B,) log π_ref of one completion per prompt (see :func:`completion_logps`)."""
        with self._model() as model:
            return completion_logps(model, prompts, completions, pad_token_id, share)

    def sequence_logps(
        self, input_ids, attention_mask, response_mask, *, temperature: float = 1.0
    ) -> torch.Tensor:
        """log π_ref(y|x) summed over response tokens, (N,) fp32, at ``temperature``."""
        with self._model() as model:
            return sequence_logps(model, input_ids, attention_mask, response_mask, temperature=temperature)[0]


def build_reference(policy, *, during_training: bool, load_copy: Callable[[], torch.nn.Module] | None = None):
    """The reference for ``policy``: adapters off under LoRA; else the policy itself when π_ref is only
    needed before training (``during_training=False``); else a frozen copy — of the policy as it is now,
    or, when ``load_copy`` is given (resuming: the policy is no longer the starting model), of its result.
    A copy keeps the policy's fp32 weights, so π_ref and π_θ agree exactly before the first step under mixed
    precision too (a bf16 copy would differ by tenths of a nat per sequence: embeddings, norms and the head
    would round differently)."""
    if is_peft(policy):
        return Reference(policy, "adapters_off")
    if not during_training:
        return Reference(policy, "initial")
    frozen = load_copy() if load_copy is not None else copy.deepcopy(unwrap_model(policy))
    frozen = frozen.to(device=next(policy.parameters()).device, dtype=next(policy.parameters()).dtype)
    if is_sharded(policy):  # training.sharding: fsdp: π_ref sharded like the policy, same compute precision
        frozen = shard_like(frozen, policy)
    return Reference(policy, "copy", frozen.eval().requires_grad_(False))


def pair_logps(
    model, pairs: Sequence[PairExample], pad_token_id: int, share_prefix: bool = True
) -> torch.Tensor:
    """(2B,) log π(y|x) of B pairs under ``model``, [chosen..., rejected...]: the one way pair log-probs are
    computed, for the policy, the reference on the fly and the precomputed reference alike (so they agree
    exactly before the first step)."""
    return pair_sequence_logps(
        model,
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_token_id,
        share_prefix=share_prefix,
    )


def completion_logps(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    share_prefix: bool = True,
) -> torch.Tensor:
    """(B,) log π(y|x) of one completion per prompt, through the same path as :func:`pair_logps` (groups of
    one), so a half of a pair computed alone equals that half of the pair."""
    flat, completion, _ = shared_prefix_logps(
        model, prompts, [[c] for c in completions], pad_token_id, share=share_prefix
    )
    return torch.zeros(len(prompts), dtype=torch.float32, device=flat.device).index_add(0, completion, flat)


def pair_reference_logps(
    reference: Reference,
    examples: Sequence[PairExample],
    pad_token_id: int,
    batch_size: int,
    share_prefix: bool = True,
) -> torch.Tensor:
    """(N, 2) [chosen, rejected] log π_ref of every pair, fp32 on CPU, in example order (one no-grad pass)."""
    out = torch.empty(len(examples), 2)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logps = reference.pair_logps(chunk, pad_token_id, share_prefix)
        out[start : start + len(chunk)] = logps.view(2, -1).T.float().cpu()  # (2B,) -> (B, 2)
    return out


def reference_cache_file(
    cfg: TrainConfig, model_path: str, examples: dict[str, Sequence[PairExample]]
) -> Path:
    """Where precomputed reference log-probs of exactly this data, starting model and numerics live across
    runs: ``$PREFTUNE_CACHE/ref_logps/<key>.safetensors``, the key a hash of the model folder's content, every
    pair's token ids, the frozen weights' dtype, the mixed precision, prefix sharing and preftune's version."""
    import hashlib
    import json

    from .. import __version__
    from ..files import folder_fingerprint
    from ..models import cache_dir

    h = hashlib.sha256()
    for split in sorted(examples):
        for e in examples[split]:
            h.update(json.dumps([split, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    key = {
        "model": folder_fingerprint(model_path),
        "data": h.hexdigest(),
        "dtype": cfg.model.dtype if cfg.model.lora.enabled else "float32",
        "mixed_precision": cfg.training.mixed_precision,
        "share_prefix": cfg.training.share_prefix,
        "preftune": __version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    root = os.environ.get("PREFTUNE_REF_CACHE")
    return (Path(root) if root else cache_dir() / "ref_logps") / f"{digest}.safetensors"


def load_pair_logps(path: Path, examples: dict[str, Sequence[PairExample]]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs from ``path``, checked against the data's splits and sizes."""
    from safetensors.torch import load_file

    ref = load_file(path)
    for split, split_examples in examples.items():
        if split not in ref or ref[split].shape != (len(split_examples), 2):
            raise RuntimeError(
                f"{path} does not match the data ({split}: {len(split_examples)} pairs); delete it"
            )
    return ref


def save_pair_logps(path: Path, ref: dict[str, torch.Tensor]) -> None:
    save_safetensors_atomic(path, ref)
