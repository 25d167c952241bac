"""Sharded training (``training.sharding: fsdp``): parameters, gradients and optimizer state split over the
processes with torch FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor), called directly.

The model is sharded in units: one per decoder layer (the classes the model names in ``_no_split_modules``,
else ``model.model.layers``), then the root (embeddings, final norm, head and whatever is left). Under LoRA
the same layers of the PEFT model are sharded, adapters and base together. Each process holds 1/N of every
parameter (a ``DTensor`` sharded on dim 0), its gradient and its AdamW moments; a unit's parameters are
all-gathered just before its forward and backward and freed after (``reshard_after_forward=True`` for every
decoder layer: the least memory; ``training.reshard_after_forward: false`` keeps them gathered until the
backward, ZeRO-2's memory and one all-gather fewer per layer and micro-batch). The policy's root unit (embeddings,
final norm, head) keeps its gathered parameters from its forward to the backward that follows at once, as
torchtitan does: they would be freed and gathered again for nothing (a frozen reference, which has no backward,
frees them). The state dict reshards first (FSDP2's pre-save hook), and every backward reshards every unit
before the optimizer step. Gradients are
reduce-scattered with a mean over processes, as DDP's all-reduce, so the loops' loss scaling is unchanged.

- ``mixed_precision: bf16``: FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the
  all-gathered copies are bf16, the master weights, gradients and optimizer state stay fp32.
- ``cpu_offload``: ``CPUOffloadPolicy``: shards, gradients and optimizer state live on the CPU between uses.
- Sampling (:func:`gathered`): every unit is all-gathered once, the whole decode loop runs on full weights
  without a collective (processes stop at different lengths), then every unit is resharded. The cost is one
  full copy of the parameters per process while sampling (compute-precision copies under bf16).
- Gradient accumulation: micro-batches before a step's last keep their gradients unsharded and unreduced
  (:func:`no_sync`, what ``accelerator.no_sync`` enters), as DDP's ``no_sync``.
- π_ref, where a copy is needed (``reference.py``), is read again from the starting model and sharded like
  the policy; the precomputed reference log-probs are computed by the sharded policy itself.
- Checkpoints (:func:`save_checkpoint` / :func:`restore_checkpoint`): ``torch.distributed.checkpoint`` (DCP),
  each process writing its own shards into one folder (on several nodes ``output_dir`` must be shared); DCP
  reshards on load, so a checkpoint of N processes resumes on M when the global batch stays the same.
- The final model (:func:`save_full`): one ordinary HF safetensors folder written by the main process from
  the gathered state dict (one full copy on the main process, none elsewhere); :func:`export` writes the same
  folder from a sharded checkpoint, offline, in one process.
- On CPU (gloo), all-gather and reduce-scatter are point-to-point exchanges (:func:`_peer_comms`), twice as
  fast there as gloo's own. Per step FSDP moves three times the bytes of DDP (all-gather in forward and again
  in backward, reduce-scatter) and allocates each unit's buffers afresh: on CPU it trades time for memory
  (docs/benchmarks.md, "Sharded training").
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ConfigError, TrainingConfig
from ..files import atomic_dir
from ..models import is_peft, unwrap

SHARDED_DIR = "sharded"  # a checkpoint's DCP folder (model and optimizer shards, every process's files)
CONFIG_DIR = "model_config"  # a checkpoint's model config, tokenizer and adapter config (no weights)
EXPORT_FILE = "export.json"  # in CONFIG_DIR: how export rebuilds the model (kind, LoRA base)
_RESHARD = "_preftune_reshard_after_forward"  # what shard_model set per unit (gathered() restores it)
_HOLDS = "_preftune_holds"  # on each unit: how many gathered() / head_kept() keep it gathered now (every
# hold includes the root, so the root's count says whether no-grad forwards may free anything)


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model` (its root is an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units to shard below the root: the outermost modules whose class the transformers model names in
    ``_no_split_modules`` (its decoder layers), else ``model.model.layers``. Found in ``model`` itself, so under
    LoRA they are the PEFT model's layers with their adapters."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    if layers:
        return layers
    found = getattr(getattr(unwrap(model), "model", None), "layers", None)
    if found is None:
        raise ValueError(
            f"training.sharding: fsdp: no decoder layers found in {type(unwrap(model)).__name__} "
            "(no _no_split_modules and no model.layers)"
        )
    return list(found)


def _mesh(device: torch.device):
    """A 1-D device mesh over every process; a run of one process gets a 1-process group of its own (FSDP2
    needs one), so its checkpoints are sharded checkpoints too."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _policies(t: TrainingConfig, device: torch.device) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    if t.mixed_precision == "fp16":
        raise ConfigError(
            "training.sharding: fsdp trains with mixed_precision no or bf16 (fp16 needs a sharded loss scaler)"
        )
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if t.mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if t.cpu_offload else OffloadPolicy()
    return {"mp_policy": mp, "offload_policy": offload}


def _peer_comms():
    """FSDP2's all-gather and reduce-scatter as one round of point-to-point sends between every pair of
    processes, for gloo (CPU): gloo's own collectives copy more (on the 2-core CPU, for a 135M model's worth of
    18 MB units: all-gather 1.3 s against 0.64 s, reduce-scatter 2.0 s against 0.8 s). Same result; the sum
    of a reduce-scatter adds the processes' parts in rank order."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import AllGather, ReduceScatter

    def exchange(sends: list, recvs: list, group) -> None:
        rank = group.rank()
        ops = []
        for peer in range(group.size()):
            if peer != rank:
                ops.append(dist.P2POp(dist.isend, sends[peer], group=group, group_peer=peer))
                ops.append(dist.P2POp(dist.irecv, recvs[peer], group=group, group_peer=peer))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    class PeerAllGather(AllGather):
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            parts = output_tensor.chunk(group.size())  # (world × shard,): rank r's shard at part r
            mine = parts[group.rank()]
            if mine.data_ptr() != input_tensor.data_ptr():  # FSDP2's input is that part of the output already
                mine.copy_(input_tensor)
            exchange([input_tensor] * group.size(), parts, group)
            return None

    class PeerReduceScatter(ReduceScatter):
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            rank, world = group.rank(), group.size()
            parts = [p.contiguous() for p in input_tensor.chunk(world)]  # part q goes to rank q
            received = [parts[q] if q == rank else torch.empty_like(output_tensor) for q in range(world)]
            exchange(parts, received, group)
            torch.add(received[0], received[1], out=output_tensor)  # one pass, no copy first
            for part in received[2:]:
                output_tensor.add_(part)
            if op == dist.ReduceOp.AVG:
                output_tensor.div_(world)
            elif op != dist.ReduceOp.SUM:
                raise ValueError(f"unsupported reduce-scatter op {op}")
            return None

    return PeerAllGather(), PeerReduceScatter()


def _use_peer_comms(units: list, mesh) -> None:
    import torch.distributed as dist

    if mesh.size() > 1 and dist.get_backend(mesh.get_group()) == "gloo":
        all_gather, reduce_scatter = _peer_comms()
        for unit in units:
            unit.set_custom_all_gather(all_gather)
            unit.set_custom_reduce_scatter(reduce_scatter)


def shard_model(model: torch.nn.Module, t: TrainingConfig, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over every process (one FSDP2 unit per decoder layer, then the root) with the
    mixed precision and offload of ``t``; returns it (its class becomes an FSDP one, its parameters
    DTensors). Frozen and trainable parameters may share a unit (LoRA), and so may dtypes (a bf16-stored
    LoRA base with fp32 adapters). ``model.no_sync()`` becomes :func:`no_sync`, so ``accelerator.no_sync``
    (the loops' gradient accumulation) skips the reduce-scatter as it skips DDP's all-reduce."""
    _shard(model, _mesh(device), _policies(t, device), layers=t.reshard_after_forward, root=False)
    # what accelerate's no_sync(model) enters for a model that has one (DDP's): the loops' accumulation
    model.no_sync = functools.partial(no_sync, model)
    return model


def shard_like(model: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` (a frozen copy: the reference) over the mesh, with the precision and offload, of the
    sharded ``policy``."""
    return _shard(model, *policy._preftune_shard_policies)


def _shard(
    model: torch.nn.Module, mesh, policies: dict, *, layers: bool = True, root: bool = True
) -> torch.nn.Module:
    """One FSDP2 unit per decoder layer, then the root, over ``mesh`` with ``policies``; ``layers`` /
    ``root``: whether those units free their gathered parameters after the forward (``reshard_after_forward``).
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=layers, **policies)
        setattr(layer, _RESHARD, layers)
    fully_shard(model, mesh=mesh, reshard_after_forward=root, **policies)
    setattr(model, _RESHARD, root)
    kept = [unit for unit in _units(model) if not getattr(unit, _RESHARD)]
    if kept:
        model.register_forward_hook(functools.partial(_reshard_without_backward, kept))
    model._preftune_shard_policies = (mesh, policies)
    _use_peer_comms(_units(model), mesh)
    return model


@contextlib.contextmanager
def head_kept(model: torch.nn.Module) -> Iterator[None]:
    """Within, the root unit of a sharded ``model`` (its output head) keeps its gathered weights after a forward,
    with or without gradients, for a computation on the head's weight after the forward (the chunked
    log-softmax, ``logprobs.py``); without gradients every unit is freed at the end. A model that is not
    sharded is left as it is."""
    root = next((m for m in model.modules() if is_sharded(m)), None)
    if root is None:
        yield
        return
    try:
        with _held([root]):
            yield
    finally:
        if not torch.is_grad_enabled():
            _release(_units(root))


@contextlib.contextmanager
def _held(units: list) -> Iterator[None]:
    """Within, ``units`` keep their gathered parameters after a forward and :func:`_reshard_without_backward`
    frees nothing; after the outermost hold of a unit, it frees them as :func:`_shard` set it to. Holds nest
    (``head_kept`` inside ``gathered`` or the reverse): each unit counts its open holds."""
    for unit in units:
        if not getattr(unit, _HOLDS, 0):
            unit.set_reshard_after_forward(False, recurse=False)
        setattr(unit, _HOLDS, getattr(unit, _HOLDS, 0) + 1)
    try:
        yield
    finally:
        for unit in units:
            setattr(unit, _HOLDS, getattr(unit, _HOLDS) - 1)
            if not getattr(unit, _HOLDS):
                unit.set_reshard_after_forward(getattr(unit, _RESHARD, True), recurse=False)


def _release(units: list) -> None:
    """Free the gathered parameters of every unit in ``units`` that no enclosing hold still keeps."""
    for unit in units:
        if not getattr(unit, _HOLDS, 0):
            unit.reshard()


def _reshard_without_backward(kept: list, model, args, output) -> None:
    """After a forward that no backward follows (no gradients: evaluation, reference or old log-probs), free the
    units that keep their gathered parameters for the backward: outside a forward/backward every unit is
    sharded, which the optimizer's state dict (by parameter identity) and the memory plan rely on. Not inside
    :func:`gathered`, whose decode loop must stay free of collectives, nor inside :func:`head_kept`."""
    if not torch.is_grad_enabled() and not getattr(model, _HOLDS, 0):
        for unit in kept:
            unit.reshard()


def _units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Gradient accumulation without the reduce-scatter: micro-batches before a step's last one keep their
    unsharded gradients locally (as DDP's ``no_sync``); the last one reduces the sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every unit's full parameters, all-gathered once, for a decode loop that runs a different number of
    forward passes on each process (sampling): forward passes inside make no collective and reshard nothing.
    Collective on entry and exit; no gradients inside. A model that is not sharded is yielded as it is."""
    if not is_sharded(model):
        yield model
        return
    units = _units(model)
    try:
        with _held(units), torch.no_grad():
            for unit in units:
                unit.unshard()
            yield model
    finally:
        _release(units)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The gradients' global L2 norm over every process, the same float on each (sharded gradients are
    DTensors: their norm is reduced over the mesh; plain ones, e.g. a value head already averaged over
    processes, count once); with ``max_norm`` the gradients are scaled by min(1, max_norm / (norm + 1e-6))
    as ``torch.nn.utils.clip_grad_norm_`` does."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded, 2.0).full_tensor().float())
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, 2.0).float().to(norms[0].device if norms else None))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(local.device, local.dtype))
    return float(total)


def full_state_dict(model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU of the main process, {} on the others (collective). Each
    parameter is all-gathered in turn and kept only by the main process, so no process ever holds more than
    one full copy. ``trainable_only``: only the parameters that train (a LoRA adapter, not its base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_full(model: torch.nn.Module, tokenizer, out_dir: Path, *, is_main: bool) -> None:
    """The final model as one ordinary HF folder (safetensors; under LoRA the adapter, whole), written by the
    main process from the gathered state dict, atomically (collective: every process calls it)."""
    state = full_state_dict(model, trainable_only=is_peft(model))
    if not is_main:
        return
    for alias in _tied_aliases(model):  # as save_pretrained leaves them out (tied embeddings and head)
        state.pop(alias, None)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _tied_aliases(model: torch.nn.Module) -> list[str]:
    """State-dict keys that name a parameter an earlier key already names (a head tied to the embeddings)."""
    seen: set[int] = set()
    aliases = []
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases.append(name)
        seen.add(id(value))
    return aliases


def _holder(model: torch.nn.Module, extra: list[torch.nn.Parameter] | None) -> torch.nn.Module:
    """The module whose parameters the optimizer steps: the model, and beside it ``extra`` parameters that are
    not the model's (PPO's value head), as ``extra.0``, ``extra.1``, ..."""
    if not extra:
        return model
    return torch.nn.ModuleDict({"model": model, "extra": torch.nn.ParameterList(extra)})


def _states(model, optimizer, extra):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    holder = _holder(model, extra)
    state = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(holder, optimizer)
    return holder, optimizer, state


def save_sharded(
    folder: Path, model: torch.nn.Module, optimizer=None, extra: list[torch.nn.Parameter] | None = None
) -> None:
    """Every process writes its shards of the model's trainable parameters and of the optimizer state into
    ``folder`` (DCP; collective). ``extra``: parameters beside the model that the optimizer also steps (their
    optimizer state is saved; their values are the caller's to save)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer, extra)[2], checkpoint_id=str(folder))


def load_sharded(
    folder: Path, model: torch.nn.Module, optimizer=None, extra: list[torch.nn.Parameter] | None = None
) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` (and ``optimizer``), resharding over
    however many processes this run has (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    holder, optimizer, state = _states(model, optimizer, extra)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(  # the frozen base (LoRA) is not in a checkpoint
        model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False)
    )
    if optimizer is not None:
        set_optimizer_state_dict(holder, optimizer, state["optim"])


# --- checkpoint folders of a sharded run ------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path, step: int, *, accelerator, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
    extra=None, extra_params: list | None = None,
) -> Path | None:  # fmt: skip
    """A sharded run's ``checkpoints/step-NNNNNNN/`` (collective): ``sharded/`` (every process's shards of
    the trainable weights and AdamW state, DCP), ``model_config/`` (config, tokenizer, adapter config: what
    :func:`export` needs), ``scheduler.pt``, ``rng.safetensors``, what ``extra(folder)`` writes, and
    ``trainer_state.json`` (with the process count and batch it was written with). Written into a temporary
    folder that the main process renames when every process has written its shards, so the checkpoint
    exists whole or not at all; older ones are rotated out after. Returns the path on the main process."""
    import shutil

    from safetensors.torch import save_file

    from ..files import replace_dir
    from .checkpoint import STATE_FILE, _rng_state, checkpoint_dirs

    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    tmp = final.parent / f".{final.name}.tmp"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()  # the folder exists before any process writes into it
    try:
        # every process writes its shards; a failure on one raises on all
        save_sharded(tmp / SHARDED_DIR, model, optimizer, extra_params)
        if main:
            save_model_config(model, tokenizer, tmp / CONFIG_DIR)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            save_file(_rng_state(), tmp / "rng.safetensors")
            if extra is not None:
                extra(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
            replace_dir(tmp, final)
    except (OSError, RuntimeError) as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = (checkpoint_dirs(Path(run_dir)) or [None])[-1]
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(
            f"writing the checkpoint of step {step} in {run_dir}/checkpoints failed ({err}); {kept}. "
            "Free space or fix permissions, then continue with --resume"
        ) from err
    if main:
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if main else None


def checkpoint_state(cfg, processes: int) -> dict:
    """What a sharded checkpoint records to check a resume on another number of processes."""
    t = cfg.training
    return {
        "sharding": "fsdp",
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "processes": processes,
    }


def restore_checkpoint(
    ckpt: Path, *, cfg, accelerator, model, optimizer, scheduler, extra_params: list | None = None, log=print
) -> dict:
    """Model shards, AdamW state, schedule and RNG from a sharded checkpoint (collective); returns its trainer
    state. Another number of processes than the checkpoint's is accepted (DCP reshards) when the steps stay
    the same: for a method with fixed examples, the global batch (batch_size × processes × grad_accum) is
    unchanged (``--allow-change training.batch_size`` to change batch_size for it); for an online method, the
    checkpoint is not in the middle of a batch of samples (each process's samples are its own)."""
    from safetensors.torch import load_file

    from .checkpoint import STATE_FILE, _set_rng_state
    from .rundir import RunDirError

    ckpt = Path(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if not (ckpt / SHARDED_DIR / ".metadata").is_file():
        raise RunDirError(
            f"--resume: {ckpt} is not a sharded checkpoint (written without training.sharding: fsdp); "
            "resume it with the sharding it was written with"
        )
    world, t = accelerator.num_processes, cfg.training
    saved = state.get("processes", world)
    if saved != world:
        if cfg.method_config.kind == "online":
            updates = cfg.method_config.updates_per_batch
            if state["step"] % updates:
                raise RunDirError(
                    f"--resume: {ckpt} is in the middle of a batch of samples (step {state['step']}, "
                    f"{updates} updates per batch), whose samples belong to its {saved} process(es): resume "
                    f"with {saved} process(es), or from a checkpoint at a batch boundary"
                )
        else:
            before = state["batch_size"] * saved * state["grad_accum"]
            now = t.batch_size * world * t.grad_accum
            if before != now:
                raise RunDirError(
                    f"--resume: {ckpt} was written with {saved} process(es) × batch_size {state['batch_size']} "
                    f"× grad_accum {state['grad_accum']} = {before} examples per step, and this run has "
                    f"{world} × {t.batch_size} × {t.grad_accum} = {now}: the batches and the learning-rate "
                    f"schedule would change. Set training.batch_size={before // (world * t.grad_accum)} "
                    "(with --allow-change training.batch_size) if that divides evenly"
                )
        log(
            f"resuming a checkpoint of {saved} process(es) on {world}: the model and optimizer shards are "
            "resharded (torch.distributed.checkpoint)"
        )
    load_sharded(ckpt / SHARDED_DIR, model, optimizer, extra_params)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _set_rng_state(load_file(ckpt / "rng.safetensors"))
    return state


def save_model_config(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """What :func:`export` needs beside the shards: the model config, the tokenizer and, under LoRA, the
    adapter config, with ``export.json`` (the model kind and the LoRA base). Main process only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    base.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"kind": "sequence_classification" if _is_seq_cls(base) else "causal_lm", "lora": is_peft(model)}
    if is_peft(model):
        from ..models import unwrap_model

        peft_model = unwrap_model(model)
        peft_model.peft_config["default"].save_pretrained(folder)
        meta["base"] = peft_model.peft_config["default"].base_model_name_or_path
    (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2))


def _is_seq_cls(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _empty_model(config, kind: str) -> torch.nn.Module:
    """A model of ``config`` with uninitialised fp32 CPU weights (every one is then loaded)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "sequence_classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    return model


def export(ckpt_dir: str | Path, out_dir: str | Path, log=print) -> Path:
    """An ordinary HF safetensors folder (the model, or under LoRA the adapter) from a sharded checkpoint,
    offline and in one process, whatever number of processes wrote it: what the run's final ``model/`` would
    be at that step."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoTokenizer

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    config_dir, shards = ckpt / CONFIG_DIR, ckpt / SHARDED_DIR
    if not ckpt.is_dir():
        raise ValueError(
            f"{ckpt}: no such checkpoint folder (a run's checkpoints are RUN_DIR/checkpoints/step-N)"
        )
    if not (shards / ".metadata").is_file() or not (config_dir / EXPORT_FILE).is_file():
        raise ValueError(
            f"{ckpt} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata or {CONFIG_DIR}/{EXPORT_FILE}): "
            "runs without training.sharding: fsdp keep the model in their checkpoints' model/ folder"
        )
    meta = json.loads((config_dir / EXPORT_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    if meta["lora"]:
        from peft import LoraConfig, get_peft_model

        from ..models import load_model

        base = load_model(
            meta["base"],
            sequence_classification=meta["kind"] == "sequence_classification",
            pad_token_id=tokenizer.pad_token_id,
        )
        model = get_peft_model(base, LoraConfig.from_pretrained(config_dir))
    else:
        model = _empty_model(AutoConfig.from_pretrained(config_dir), meta["kind"])
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if k in names or not meta["lora"]}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(shards), no_dist=True)
    model.load_state_dict(state, strict=False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log(f"exported {ckpt} to {out}")
    return out


__all__ = [
    "clip_grad_norm",
    "decoder_layers",
    "export",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "load_sharded",
    "no_sync",
    "save_full",
    "save_model_config",
    "save_checkpoint",
    "save_sharded",
    "restore_checkpoint",
    "checkpoint_state",
    "shard_like",
    "shard_model",
]
