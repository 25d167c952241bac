"""Memory you can plan: what one training process holds at its peak, from the model's config and the run's
shapes, before the run starts. ``preftune validate`` prints it; the arithmetic is the pure
functions below (bytes throughout), and :func:`plan_run` reads their inputs off a prepared run.

One process holds all through training (the **resident** part):

- **parameters** in their storage dtype (trained ones fp32);
- **optimizer**: fused AdamW's ``exp_avg`` and ``exp_avg_sq``, 2 × 4 bytes per trainable parameter (from the
  first step on);
- **DDP buckets** (several processes, no sharding): DDP all-reduces through a flat fp32 copy of the
  trainable gradients;
- **reference** π_ref: a frozen fp32 copy under full fine-tuning when it runs while the policy trains (pair
  methods without ``precompute_ref``, KTO, online methods at β > 0, and the online evaluation's KL, whose copy
  is made at the first evaluation after a step and kept); the precomputed log-probs (8 bytes a pair); nothing
  under LoRA (adapters off) or without a reference;

and, in turn, one of two **phases**:

- **training** a micro-batch: the gradients (4 bytes per trainable parameter; ``zero_grad(set_to_none)``
  frees them after each step) and the activations the backward needs (:func:`activation_bytes`) of the
  longest micro-batch, plus the response logits (:func:`logits_bytes`);
- **sampling** (online methods): the KV cache of the sequences decoded at once (:func:`kv_cache_bytes`) and
  their last-position logits.

peak = baseline + resident + max(training, sampling), with ``baseline`` the process without tensors
(Python, torch, transformers, accelerate, the tokenizer and the data: :data:`BASELINE_BYTES`, measured).
On a GPU the tensor rows are device memory and the baseline is host memory.

What the estimate leaves out: activations are counted in fp32 (bf16 autocast keeps roughly half); attention is
assumed not to hold (T, T) scores (SDPA / flash kernels; ``attn_implementation: eager`` holds
heads × T² floats a layer); reward models named in an online method's rewards; DDP's communication buffers
beyond the gradient buckets. ``benchmarks/bench_memory.py`` compares the plan with measured peaks
(docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..logprobs import CHUNK_ELEMENTS, CHUNKED_ABOVE

FP32 = 4
# a training process without its tensors: Python with torch 2.13, transformers, accelerate and preftune
# imported and the tokenizer loaded (0.39 GB measured), plus the data, accelerate's state and the allocator's
# share: RSS minus the planned resident tensors between steps measured 0.50-0.59 GB in DPO and GRPO runs of the
# embedded model on CPU (benchmarks/bench_memory.py; GB = 10⁹ bytes throughout)
BASELINE_BYTES = 550 * 10**6
# floats a Llama-style decoder layer keeps per token for its backward: each RMSNorm its input, the normalised
# input and the scaled output (2 × 3·hidden); attention q, k and v (GQA heads repeated) and its output
# (4·hidden) and o_proj's contiguous input (hidden); the MLP gate, silu(gate), up and their product
# (4·intermediate). 11·hidden + 4·intermediate = 21.7·hidden on SmolLM2-135M: 1.50 MB a token over its 30
# layers, measured 1.35-1.53 (bench_memory.py --activations)
ACTIVATION_HIDDEN, ACTIVATION_INTERMEDIATE = 11, 4
# with gradient checkpointing a layer keeps its input only (measured ≈ 1.6·hidden floats a token); the one
# layer recomputed in the backward holds its full activations meanwhile
CHECKPOINT_HIDDEN = 1.6
# response logits (M, V) fp32: the log-softmax output kept for the backward and its gradient in the backward
LOGITS_COPIES = 2
# decoding: the last position's logits (fp32), their tempered copy and the probabilities
DECODE_LOGITS_COPIES = 3


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its memory depends on (a Hugging Face config's)."""

    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (or its ``to_dict()``): Llama/Mistral/Qwen names, with
        GPT-2's (``n_layer``, ``n_embd``) as fallbacks."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden = get("hidden_size") or get("n_embd")
        heads = get("num_attention_heads") or get("n_head")
        if not hidden or not heads:
            raise ValueError(
                "the model config gives no hidden_size / num_attention_heads: cannot plan memory"
            )
        return cls(
            layers=int(get("num_hidden_layers") or get("n_layer")),
            hidden=int(hidden),
            intermediate=int(get("intermediate_size") or get("n_inner") or 4 * hidden),
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
        )


@dataclass(frozen=True)
class MicroBatch:
    """The longest micro-batch of a run: ``tokens`` positions the model runs (padding included) and
    ``response_tokens`` positions the LM head runs on (M; 0 for a scalar head)."""

    tokens: int
    response_tokens: int


@dataclass(frozen=True)
class Decoding:
    """Sampling: ``rows`` sequences decoded at once, each up to ``length`` = prompt + new tokens."""

    rows: int
    length: int


def activation_bytes(shape: ModelShape, tokens: int, *, checkpointing: bool) -> int:
    """What the forward of ``tokens`` positions keeps for the backward (fp32): every layer's tensors
    (``layers × tokens × (11·hidden + 4·intermediate) × 4``), or with gradient checkpointing every layer's input
    plus one layer's tensors while it is recomputed."""
    per_layer = (
        tokens * (ACTIVATION_HIDDEN * shape.hidden + ACTIVATION_INTERMEDIATE * shape.intermediate) * FP32
    )
    if not checkpointing:
        return shape.layers * per_layer
    return int(shape.layers * tokens * shape.hidden * FP32 * CHECKPOINT_HIDDEN) + per_layer


def logits_bytes(shape: ModelShape, response_tokens: int) -> int:
    """The LM head's logits of ``response_tokens`` positions (the head runs on response positions only,
    :mod:`preftune.logprobs`): M × V × 4 × 2, or, above ``CHUNKED_ABOVE`` logits, two 32 MiB chunks."""
    logits = response_tokens * shape.vocab
    if logits > CHUNKED_ABOVE:
        return LOGITS_COPIES * CHUNK_ELEMENTS * FP32
    return LOGITS_COPIES * logits * FP32


def kv_cache_bytes(shape: ModelShape, decoding: Decoding, *, element_bytes: int = FP32) -> int:
    """Keys and values of every layer for ``decoding.rows`` sequences of ``decoding.length`` tokens:
    layers × 2 × kv_heads × head_dim × length × rows × bytes, plus the last position's logits."""
    kv = shape.layers * 2 * shape.kv_heads * shape.head_dim * decoding.length * decoding.rows * element_bytes
    return kv + DECODE_LOGITS_COPIES * decoding.rows * shape.vocab * FP32


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one process holds (see the module docstring); ``total`` is the planned peak."""

    parameters: int
    optimizer: int
    ddp_buckets: int
    reference: int
    reference_kind: str
    gradients: int
    activations: int  # at the longest micro-batch, with the run's gradient_checkpointing
    activations_other: int  # the same with gradient_checkpointing switched the other way
    logits: int
    gradient_checkpointing: bool
    sampling: int  # KV cache and decode logits; 0 for offline methods
    baseline: int = BASELINE_BYTES
    processes: int = 1
    tokens: int = 0  # of the longest micro-batch (padding included)
    response_tokens: int = 0  # of the longest micro-batch: where the LM head runs
    decoding: tuple[int, int] = (0, 0)  # (rows decoded at once, prompt + new tokens)

    @property
    def resident(self) -> int:
        return self.parameters + self.optimizer + self.ddp_buckets + self.reference

    @property
    def training(self) -> int:
        return self.gradients + self.activations + self.logits

    @property
    def total(self) -> int:
        return self.baseline + self.resident + max(self.training, self.sampling)

    def to_dict(self) -> dict:
        return {**asdict(self), "resident": self.resident, "training": self.training, "total": self.total}

    @classmethod
    def from_dict(cls, d: dict) -> MemoryPlan:
        """The plan of :meth:`to_dict` (its derived sums dropped)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "decoding": tuple(fields.get("decoding", (0, 0)))})  # JSON gives a list

    def lines(self) -> list[str]:
        """The plan as text, one component a line, in GB (10⁹ bytes)."""
        other = "without" if self.gradient_checkpointing else "with"
        rows = [
            ("parameters", self.parameters, ""),
            ("optimizer state", self.optimizer, "AdamW fp32: 2 × trainable"),
            ("DDP gradient buckets", self.ddp_buckets, f"{self.processes} processes"),
            ("reference", self.reference, self.reference_kind),
            ("gradients", self.gradients, "training phase"),
            (
                "activations",
                self.activations,
                f"longest micro-batch ({self.tokens} tokens), gradient_checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'} ({other} it: {_gb(self.activations_other)})",
            ),
            ("response logits", self.logits, f"{self.response_tokens} response tokens"),
            ("sampling KV cache", self.sampling, "{} sequences × {} tokens".format(*self.decoding)),
            ("baseline", self.baseline, "python, torch, tokenizer, data"),
        ]
        phase = "training" if self.training >= self.sampling else "sampling"
        out = [f"memory plan per process ({self.processes} process{'es' if self.processes > 1 else ''}):"]
        out += [
            f"  {name:<22}{_gb(n):>9}  {note}".rstrip() for name, n, note in rows if n or name == "reference"
        ]
        out.append(f"  {'peak':<22}{_gb(self.total):>9}  baseline + resident + the {phase} phase")
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def memory_plan(
    shape: ModelShape,
    *,
    parameter_bytes: int,
    trainable: int,
    reference_kind: str,
    reference_bytes: int,
    batch: MicroBatch,
    gradient_checkpointing: bool,
    decoding: Decoding | None = None,
    kv_element_bytes: int = FP32,
    processes: int = 1,
    sharded: bool = False,
    reshard_after_forward: bool = True,
) -> MemoryPlan:
    """The plan of one process: ``parameter_bytes`` the model's parameters as stored, ``trainable`` the count
    of trained (fp32) parameters, the reference's kind and bytes, the longest micro-batch, and for online
    methods the decoding batch. ``sharded`` (``training.sharding: fsdp``): parameters, gradients, optimizer
    state and a reference copy are split over the processes (no DDP buckets); the training phase gathers one
    decoder layer's parameters at a time (every layer's from forward to backward without
    ``reshard_after_forward``), sampling gathers the whole model once."""
    share = processes if sharded else 1
    acts = {ckpt: activation_bytes(shape, batch.tokens, checkpointing=ckpt) for ckpt in (False, True)}
    copy = reference_kind.startswith("frozen copy")
    gathered_layer = parameter_bytes // max(shape.layers, 1) if sharded and share > 1 else 0
    if sharded and share > 1 and not reshard_after_forward:
        gathered_layer = parameter_bytes - parameter_bytes // share  # all of them, till the backward
    gathered_model = parameter_bytes - parameter_bytes // share if decoding else 0
    return MemoryPlan(
        parameters=parameter_bytes // share,
        optimizer=2 * trainable * FP32 // share,
        ddp_buckets=trainable * FP32 if processes > 1 and not sharded else 0,
        reference=reference_bytes // share if copy else reference_bytes,
        reference_kind=reference_kind,
        gradients=trainable * FP32 // share + gathered_layer,
        activations=acts[gradient_checkpointing],
        activations_other=acts[not gradient_checkpointing],
        logits=logits_bytes(shape, batch.response_tokens),
        gradient_checkpointing=gradient_checkpointing,
        sampling=(kv_cache_bytes(shape, decoding, element_bytes=kv_element_bytes) + gathered_model)
        if decoding
        else 0,
        processes=processes,
        tokens=batch.tokens,
        response_tokens=batch.response_tokens,
        decoding=(decoding.rows, decoding.length) if decoding else (0, 0),
    )


def longest_pair_batch(
    prompts: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    batch_size: int,
    *,
    share_prefix: bool,
) -> MicroBatch:
    """The longest micro-batch of ``batch_size`` pairs (token counts per pair): one row per pair (prompt,
    chosen, rejected) with ``share_prefix``, else two rows (prompt + response), right-padded to the longest."""
    if share_prefix:
        row, rows = max(p + c + r for p, c, r in zip(prompts, chosen, rejected)), batch_size
    else:
        row, rows = max(p + max(c, r) for p, c, r in zip(prompts, chosen, rejected)), 2 * batch_size
    responses = sorted((c + r for c, r in zip(chosen, rejected)), reverse=True)
    return MicroBatch(tokens=rows * row, response_tokens=sum(responses[:batch_size]))


def capped_batch(batch: MicroBatch, limit: int | None, longest_record: int) -> MicroBatch:
    """The longest forward pass under ``training.max_tokens_per_batch`` = ``limit``: a micro-batch runs in passes
    of at most ``limit`` padded tokens, or one record alone when it is longer (``longest_record`` tokens as
    the layout pads it); the response tokens of a pass are at most its tokens."""
    if limit is None:
        return batch
    tokens = min(batch.tokens, max(limit, longest_record))
    return MicroBatch(tokens=tokens, response_tokens=min(batch.response_tokens, tokens))


def longest_group_batch(
    prompt_len: int, completion_len: int, group_size: int, batch_size: int, *, share_prefix: bool
) -> MicroBatch:
    """The longest training micro-batch of an online method: ``max(1, batch_size // G) × G`` completions of
    ``completion_len`` tokens after prompts of ``prompt_len``; one row per group with ``share_prefix``."""
    completions = max(1, batch_size // group_size) * group_size
    if share_prefix:
        tokens = completions // group_size * (prompt_len + group_size * completion_len)
    else:
        tokens = completions * (prompt_len + completion_len)
    return MicroBatch(tokens=tokens, response_tokens=completions * completion_len)


def decoding_rows(gen_batch_size: int, samples_per_prompt: int, prompts: int) -> int:
    """Sequences decoded at once (:func:`preftune.sampling.sample_ids`): ``max(1, batch_size // k)`` prompts of
    ``k`` samples, at most the ``prompts`` there are."""
    return min(max(1, gen_batch_size // samples_per_prompt), max(1, prompts)) * samples_per_prompt


def plan_run(cfg, prep, model, num_processes: int = 1) -> MemoryPlan:
    """The plan of a prepared run (``prep``: :func:`preftune.training.prepare.prepare`'s) with ``model``
    built as training builds it (its parameters counted, not run)."""
    from .reference import precomputes_reference, uses_reference

    t = cfg.training
    shape = ModelShape.from_config(getattr(model, "config", None) or model.base_model.config)
    params = list(model.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    copy_bytes = sum(p.numel() for p in params) * FP32  # a frozen copy is loaded in fp32
    method_kind = cfg.method_config.kind
    online = method_kind == "online"
    kind, ref_bytes = "none", 0
    if uses_reference(cfg) or (online and "eval" in prep.examples):
        if cfg.model.lora.enabled:
            kind = "adapters disabled (no copy)"
        elif precomputes_reference(cfg):
            kind, ref_bytes = "precomputed log-probs", 8 * sum(len(v) for v in prep.examples.values())
        else:
            kind, ref_bytes = "frozen copy", copy_bytes
            if online and not uses_reference(cfg):
                kind = "frozen copy (evaluation KL, from the first evaluation on)"
    decoding, kv_bytes = None, FP32
    if online:
        m, gen = cfg.method_config, cfg.generation
        prompt_len = max(len(e.prompt_ids) for split in prep.examples.values() for e in split)
        k = m.completions_per_prompt
        batch = longest_group_batch(
            prompt_len, gen.max_new_tokens, k, t.batch_size, share_prefix=t.share_prefix
        )
        rows = decoding_rows(gen.batch_size, k, m.prompts_per_batch // num_processes)
        if "eval" in prep.examples:
            k_eval = getattr(m, "eval_samples_per_prompt", 1)
            n_eval = -(-len(prep.examples["eval"]) // num_processes)
            rows = max(rows, decoding_rows(gen.batch_size, k_eval, n_eval))
        decoding = Decoding(rows=rows, length=prompt_len + gen.max_new_tokens)
        kv_bytes = FP32 if t.mixed_precision == "no" else 2
    else:
        train = prep.examples["train"]
        if method_kind == "unpaired":
            lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in train]
            responses = sorted((len(e.completion_ids) for e in train), reverse=True)
            batch = MicroBatch(t.batch_size * max(lengths), sum(responses[: t.batch_size]))
            batch = capped_batch(batch, t.max_tokens_per_batch, max(lengths))
        else:
            batch = longest_pair_batch(
                [len(e.prompt_ids) for e in train],
                [len(e.chosen_ids) for e in train],
                [len(e.rejected_ids) for e in train],
                t.batch_size,
                share_prefix=t.share_prefix and method_kind != "reward_model",
            )
            share = t.share_prefix and method_kind != "reward_model"
            one = longest_pair_batch(
                [len(e.prompt_ids) for e in train],
                [len(e.chosen_ids) for e in train],
                [len(e.rejected_ids) for e in train],
                1,
                share_prefix=share,
            )
            batch = capped_batch(batch, t.max_tokens_per_batch, one.tokens)
            if method_kind == "reward_model":  # a scalar head: no vocabulary logits
                batch = MicroBatch(batch.tokens, 0)
    return memory_plan(
        shape,
        parameter_bytes=parameter_bytes,
        trainable=trainable,
        reference_kind=kind,
        reference_bytes=ref_bytes,
        batch=batch,
        gradient_checkpointing=t.gradient_checkpointing,
        decoding=decoding,
        kv_element_bytes=kv_bytes,
        processes=num_processes,
        sharded=t.sharding == "fsdp",
        reshard_after_forward=t.reshard_after_forward,
    )
