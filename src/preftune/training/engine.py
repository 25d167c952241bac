"""What every training loop shares: the optimizer and schedule, one guarded optimizer step, the metrics log,
checkpoint save/restore, and the signal handling that makes an interrupted run resumable.

The offline loop (``loop.py``) and the online loop (``online.py``) are short, visible loops that call these;
neither is a flag of the other.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, TrainingConfig
from .checkpoint import load_checkpoint_state, save_checkpoint


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
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, log_with=t.report_to or None, project_dir=str(run_dir)
    )
    if t.mixed_precision != "no" and not accelerator.native_amp:
        raise ConfigError(
            f"training.mixed_precision: {t.mixed_precision} is not available on {accelerator.device} "
            "(fp16 needs a CUDA GPU); use bf16, or no"
        )
    return accelerator


def build_optimizer(t: TrainingConfig, params: list[torch.nn.Parameter], n_steps: int):
    """AdamW over ``params`` and the learning-rate schedule of ``training`` over ``n_steps`` optimizer steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.adam_betas)
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=n_steps,
    )
    return optimizer, scheduler


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), raised like Ctrl-C: checkpoint, then exit non-zero."""


_HELD = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM raises :class:`Terminated`, which every loop handles like Ctrl-C."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def hold_interrupt():
    """Hold Ctrl-C and SIGTERM until the block ends, so an optimizer step is applied whole or not at all."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in pending:
        raise Terminated
    if pending:
        raise KeyboardInterrupt


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite."""


@dataclass
class StepOutcome:
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    skipped: bool = False  # no update was applied (non-finite, skipped by policy or by the fp16 loss scaler)


def optimizer_step(
    accelerator,
    optimizer,
    scheduler,
    params,
    max_grad_norm: float | None,
    *,
    finite_loss: bool = True,
    skip_nonfinite: bool = False,
) -> StepOutcome:
    """Clip, step and advance the schedule as one uninterruptible unit; zero the gradients.

    ``finite_loss``: whether every loss of the step, on every process, was finite. A non-finite loss or
    gradient norm raises :class:`NonFiniteError` before anything is applied, or, with ``skip_nonfinite``,
    drops the step's gradients and returns ``skipped``. Under fp16 loss scaling the gradients are unscaled
    first, and inf/NaN gradients with a finite loss are the scaler's business: it skips the step and lowers
    the scale, as it should while it calibrates. A skipped step does not advance the schedule.
    """
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))  # unscales under fp16
    else:
        accelerator.unscale_gradients()
        grads = [p.grad.norm() for p in params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
    lr = scheduler.get_last_lr()[0]
    scaler_decides = accelerator.scaler is not None and finite_loss
    if not (finite_loss and math.isfinite(grad_norm)) and not scaler_decides:
        optimizer.zero_grad(set_to_none=True)
        if skip_nonfinite:
            return StepOutcome(grad_norm, lr, skipped=True)
        what = "loss" if not finite_loss else "gradient norm"
        raise NonFiniteError(f"non-finite {what} (grad_norm={grad_norm})")
    with hold_interrupt():
        optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped
        if not skipped:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm, lr, skipped=skipped)


class MetricsLog:
    """``metrics.jsonl`` in the run directory (one JSON object per line) plus accelerate trackers."""

    def __init__(self, path: Path, accelerator, *, keep_until_step: int | None = None):
        self.path = path
        self.accelerator = accelerator
        if keep_until_step is not None and path.exists() and accelerator.is_main_process:
            # resume: drop rows past the checkpoint
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= keep_until_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
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


def save_state(
    run_dir, step, accelerator, model, tokenizer, optimizer, scheduler, keep, state=None
) -> Path | None:
    """Checkpoint at ``step`` (every process waits; the main process writes)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
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
    )


def restore_state(resume_from: Path, accelerator, optimizer, scheduler) -> dict:
    """Optimizer, scheduler, loss scaler and RNG from a checkpoint; returns its trainer state (``step``...)."""
    return load_checkpoint_state(
        resume_from, optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler
    )
