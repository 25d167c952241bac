"""What every training loop shares: the optimizer and schedule, one guarded optimizer step, the metrics log,
checkpoint save/restore, and the signal handling that makes an interrupted run resumable.

The offline loop (``loop.py``) and the online loop (``online.py``) are short, visible loops that call these;
neither is a flag of the other.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

import torch

from ..config import TrainingConfig
from .checkpoint import load_checkpoint_state, save_checkpoint


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


@contextlib.contextmanager
def hold_interrupt():
    """Hold Ctrl-C until the block ends, so an optimizer step is applied whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def optimizer_step(
    accelerator, optimizer, scheduler, params, max_grad_norm: float | None
) -> tuple[float, float]:
    """Clip, step and advance the schedule as one uninterruptible unit; zero the gradients.

    Returns (gradient norm before clipping, the learning rate the step used).
    """
    if max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    lr = scheduler.get_last_lr()[0]
    with hold_interrupt():
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


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
        state=state or {},
        keep=keep,
    )


def restore_state(resume_from: Path, optimizer, scheduler) -> dict:
    """Optimizer, scheduler and RNG from a checkpoint; returns its trainer state (``step`` etc.)."""
    return load_checkpoint_state(resume_from, optimizer=optimizer, scheduler=scheduler)
