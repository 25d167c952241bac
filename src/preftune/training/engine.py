"""What every training loop shares: the optimizer and schedule, one guarded optimizer step (:class:`Stepper`),
the metrics log, checkpoint save/restore, and what a loop does when it must stop (:func:`stop_checkpoint`).

The offline loop (``loop.py``) and the online loop (``online.py``) each write their own step; the protocol
around it, built from these, is one :class:`preftune.training.harness.StepHarness` they share. Neither loop is
a flag of the other. Signals: :mod:`preftune.training.signals`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, TrainingConfig
from .checkpoint import load_checkpoint_state, save_checkpoint

MAX_SCALER_SKIPS = 50  # consecutive fp16 loss-scaler skips before the run stops: the gradients stay inf


MMAP_THRESHOLD = 512 * 1024  # bytes; PREFTUNE_MMAP_THRESHOLD overrides it (benchmarks/bench_allocator.py)


def limit_heap_growth() -> None:
    """Ask glibc to serve every allocation above :data:`MMAP_THRESHOLD` by mmap (``M_MMAP_THRESHOLD``), so
    freed tensors go back to the system. By default glibc raises that threshold after the first large free,
    and later tensors come from the heap, which fragments and is never returned: on the 2-core CPU a GRPO run
    of the 135M model peaked 11% higher (3.62 against 3.23 GB). Linux with glibc only;
    ``PREFTUNE_MMAP_THRESHOLD=<bytes>`` sets another threshold, ``PREFTUNE_NO_MALLOPT=1`` leaves the allocator
    as it is."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("PREFTUNE_NO_MALLOPT"):
        return
    threshold = int(os.environ.get("PREFTUNE_MMAP_THRESHOLD") or MMAP_THRESHOLD)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also turns the dynamic adjustment off
    except (OSError, AttributeError):
        pass


def check_mixed_precision(t: TrainingConfig) -> None:
    """fp16 autocast and loss scaling need a CUDA GPU (on CPU accelerate would silently not autocast)."""
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 (CPU or GPU), or no")


def make_accelerator(t: TrainingConfig, run_dir: Path):
    """The accelerate ``Accelerator`` of a run: its process group, device and mixed precision.

    Mixed precision (``training.mixed_precision``) is autocast over fp32 master weights, with loss scaling
    for fp16. accelerate keeps one process-wide state; a run in the same process with another precision
    (a notebook training twice) resets the precision part of it, never the process group.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != t.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    check_mixed_precision(t)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, log_with=t.report_to or None, project_dir=str(run_dir)
    )
    if t.mixed_precision != "no" and not accelerator.native_amp:
        raise ConfigError(
            f"training.mixed_precision: {t.mixed_precision} is not available on {accelerator.device}; use no"
        )
    return accelerator


def tracker_config(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """``config`` (the resolved config's nested dict) flattened for a tracker's hyperparameters: keys
    ``section.key`` (``model.lora.r``), values int / float / str / bool as TensorBoard's hparams require
    (lists, mappings inside lists and None become their JSON text)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the device supports it (on this 2-core CPU one step of a 135M
    model takes 0.07 s fused against 0.6 s, and no full-size temporaries), else the per-parameter loop
    (foreach would hold temporaries the size of all parameters)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=False, **kwargs)


def build_optimizer(t: TrainingConfig, params: list, n_steps: int):
    """AdamW over ``params`` (parameters, or parameter groups: dicts that may set their own ``lr``) and the
    learning-rate schedule of ``training`` over ``n_steps`` optimizer steps (each group's rate follows it)."""
    from transformers import get_scheduler

    optimizer = _adamw(params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.adam_betas))
    scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=n_steps,
    )
    return optimizer, scheduler


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite."""


@dataclass
class StepOutcome:
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    skipped: bool = False  # no update: a non-finite step skipped by training.skip_nonfinite
    scaler_skipped: bool = False  # no update: the fp16 loss scaler found inf/NaN gradients (calibrating)


class Stepper:
    """One guarded optimizer step: clip, check, step, advance the schedule, zero the gradients; and the
    counters a checkpoint keeps.

    ``finite_loss``: whether every loss of the step, on every process, was finite. A non-finite loss or
    gradient norm raises :class:`NonFiniteError` before anything is applied, or, with
    ``training.skip_nonfinite``, drops the step's gradients (``skipped``). Under fp16 loss scaling, inf/NaN
    gradients with a finite loss are the scaler's business: it skips the step and lowers the scale, as it
    should while it calibrates (``scaler_skipped``; after :data:`MAX_SCALER_SKIPS` in a row the run stops).
    A step without an update does not advance the schedule. The loop defers signals (see ``signals.py``),
    so a step is never torn.
    """

    def __init__(self, accelerator, optimizer, scheduler, params, t: TrainingConfig, *, sharded=False):
        self.accelerator, self.optimizer, self.scheduler, self.params, self.t = (
            accelerator, optimizer, scheduler, params, t,
        )  # fmt: skip
        self.sharded = sharded  # FSDP2 (sharding.py): the gradients are DTensor shards
        self.nonfinite_skipped = 0
        self.scaler_skipped = 0
        self.restored: dict = {}
        self._scaler_streak = 0

    def step(self, finite_loss: bool = True) -> StepOutcome:
        acc, t = self.accelerator, self.t
        if self.sharded:  # the global norm over every shard, the same on every process
            from .sharding import clip_grad_norm

            grad_norm = clip_grad_norm(self.params, t.max_grad_norm)
        elif t.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(self.params, t.max_grad_norm))  # unscales under fp16
        else:
            acc.unscale_gradients()
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        lr = self.scheduler.get_last_lr()[0]
        scaler_decides = acc.scaler is not None and finite_loss
        if not (finite_loss and math.isfinite(grad_norm)) and not scaler_decides:
            self.optimizer.zero_grad(set_to_none=True)
            if t.skip_nonfinite:
                if acc.scaler is not None:
                    acc.scaler.update()  # the gradients were unscaled: close the scaler's step
                self.nonfinite_skipped += 1
                return StepOutcome(grad_norm, lr, skipped=True)
            what = "loss" if not finite_loss else "gradient norm"
            raise NonFiniteError(f"non-finite {what} (grad_norm={grad_norm})")
        self.optimizer.step()
        scaler_skipped = bool(acc.optimizer_step_was_skipped)
        if not scaler_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler_skipped += scaler_skipped
        self._scaler_streak = self._scaler_streak + 1 if scaler_skipped else 0
        if self._scaler_streak >= MAX_SCALER_SKIPS:
            raise NonFiniteError(
                f"the fp16 loss scaler skipped {MAX_SCALER_SKIPS} steps in a row: the gradients stay inf/NaN "
                "at every scale; use bf16, lower the learning rate, or look at the data"
            )
        return StepOutcome(grad_norm, lr, scaler_skipped=scaler_skipped)

    def state(self) -> dict:
        """What a checkpoint keeps besides the optimizer and schedule."""
        return {
            "nonfinite_skipped": self.nonfinite_skipped,
            "loss_scale_skipped": self.scaler_skipped,
            "processes": self.accelerator.num_processes,
        }

    def metrics(self) -> dict:
        return {"nonfinite_skipped": self.nonfinite_skipped, "loss_scale_skipped": self.scaler_skipped}

    def restore(self, resume_from: Path, load=None) -> int:
        """Optimizer, scheduler, loss scaler, RNG and counters from a checkpoint; returns its step. ``load()``:
        restores them instead and returns the trainer state (a sharded checkpoint, sharding.py)."""
        if load is not None:
            state = load()
        else:
            state = restore_state(resume_from, self.accelerator, self.optimizer, self.scheduler)
        self.restored = state  # the whole trainer state, for what a loop keeps beside the counters
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.scaler_skipped = state.get("loss_scale_skipped", 0)
        return state["step"]


def end_of_step(
    step: int, n_steps: int, t: TrainingConfig, row: dict, *, metrics_log, accelerator, signals, evaluate, save,
    on_step_end,
) -> None:  # fmt: skip
    """What every loop does after optimizer step ``step`` (1-based), in order: log the row, evaluate and
    checkpoint when due (not at the last step: the caller's final evaluation and save do that), call back,
    and raise the stop a signal asked for, agreed by every process."""
    if step % t.log_every == 0 or step == n_steps:
        metrics_log.write(row)
    if evaluate is not None and t.eval_every and step % t.eval_every == 0 and step < n_steps:
        metrics_log.write({"step": step, "split": "eval", **evaluate()})
    if t.save_every and step % t.save_every == 0 and step < n_steps:
        save(step)
    if on_step_end is not None:
        on_step_end(step, row)
    stop = signals.requested(accelerator)
    if stop is not None:
        raise stop


def stop_checkpoint(exc: BaseException, *, consistent: bool, accelerator, save, log) -> None:
    """What a loop does when it stops early: checkpoint the last completed step when that is safe, and say so.

    ``consistent``: no optimizer step is half applied. The save is collective, so it is made only where every
    process stops at this same point — a stop agreed through :meth:`StopSignals.requested`, or a non-finite
    step, which every process sees — or with one process; else no process waits forever on one that went
    on. ``save()`` writes the checkpoint.
    """
    kind = type(exc).__name__
    synchronized = getattr(exc, "agreed", False) or isinstance(exc, NonFiniteError)
    if consistent and (synchronized or accelerator.num_processes == 1):
        path = save()
        if accelerator.is_main_process and path is not None:
            log(f"\nstopped ({kind}): saved {path}; continue with --resume")
    elif accelerator.is_main_process:
        log(
            f"\nstopped at once ({kind}): no checkpoint written now; --resume continues from the last periodic one"
        )


def trim_jsonl(path: Path, keep_until_step: int) -> None:
    """Resume: drop the rows of ``path`` logged after the checkpoint's step. A torn last line (the process was
    killed while appending) is dropped; a bad line elsewhere is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # torn by a kill while writing
            raise ValueError(
                f"{path} line {number}: not valid JSON ({err.msg}); fix or delete the line"
            ) from None
        if row.get("step", 0) <= keep_until_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def finite_or_none(row: dict) -> dict:
    """Non-finite floats become None (JSON has no Infinity or NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class MetricsLog:
    """``metrics.jsonl`` in the run directory (one JSON object per line) plus accelerate trackers."""

    def __init__(self, path: Path, accelerator, *, keep_until_step: int | None = None):
        self.path = path
        self.accelerator = accelerator
        if keep_until_step is not None and accelerator.is_main_process:
            trim_jsonl(path, keep_until_step)

    def write(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        row = finite_or_none(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {
            f"{row['split']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"
        }
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=row["step"])


def sum_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each key summed over all processes (identity with one process)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    return dict(zip(keys, total.tolist()))


def max_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each key's largest value over all processes (identity with one process)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    return dict(zip(keys, accelerator.reduce(local.to(accelerator.device), reduction="max").cpu().tolist()))


def save_state(
    run_dir, step, accelerator, model, tokenizer, optimizer, scheduler, keep, state=None, extra=None
) -> Path | None:
    """Checkpoint at ``step`` (every process waits; the main process writes). ``extra(folder)`` writes
    what else a loop needs to resume (an online loop's current samples) into the checkpoint folder. A
    failed write says so and that the previous checkpoint is intact."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    try:
        return save_checkpoint(
            run_dir,
            step,
            model=accelerator.unwrap_model(model),
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=accelerator.scaler,
            state=state or {},
            keep=keep,
            extra=extra,
        )
    except (OSError, RuntimeError) as err:
        from .checkpoint import latest_checkpoint

        previous = latest_checkpoint(Path(run_dir))
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(
            f"writing the checkpoint of step {step} in {run_dir}/checkpoints failed ({err}); {kept}. "
            "Free space or fix permissions, then continue with --resume"
        ) from err


def restore_state(resume_from: Path, accelerator, optimizer, scheduler) -> dict:
    """Optimizer, scheduler, loss scaler and RNG from a checkpoint; returns its trainer state (``step``...).
    A run saved with another number of processes is refused: its batches and schedule would change."""
    from .rundir import RunDirError

    state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
    saved = state.get("processes", accelerator.num_processes)
    if saved != accelerator.num_processes:
        raise RunDirError(
            f"--resume: {resume_from} was written by a run with {saved} process(es), and this one has "
            f"{accelerator.num_processes}; the batches, step count and learning-rate schedule would change. "
            f"Resume with {saved} process(es)"
        )
    return load_checkpoint_state(
        resume_from, optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler
    )
