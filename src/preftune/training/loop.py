"""The optimizer-step loop shared by every offline family (pairs, reward model).

A family supplies ``make_batch(indices) -> batch`` and ``compute(model, batch) -> (losses (B,), metrics)``;
this loop owns ordering, accumulation, clipping, the schedule, evaluation, checkpoints and logging.

Ordering is a pure function of (seed, epoch): epoch e visits ``randperm(n, seed + e)`` in micro-batches of
``batch_size * world_size`` pairs (rank r takes every world-th pair), and ``grad_accum`` consecutive
micro-batches make one optimizer step. The step loss is the sum of per-example losses divided by the
number of examples in the step, so batch 4 × accumulation 1 and batch 1 × accumulation 4 take the same
step, and a resumed run replays exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from .checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint

Compute = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StepPlan:
    n: int
    batch_size: int
    grad_accum: int
    seed: int
    world_size: int = 1
    rank: int = 0
    _cache: dict = field(default_factory=dict)

    @property
    def micro_per_epoch(self) -> int:
        # with several processes, a last micro-batch too small to give every rank a pair is dropped,
        # so that all ranks take the same steps
        size = self.batch_size * self.world_size
        return self.n // size + (1 if self.n % size >= self.world_size else 0)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            size = self.batch_size * self.world_size
            micro = [perm[i : i + size][self.rank :: self.world_size] for i in range(0, self.n, size)]
            self._cache = {epoch: micro[: self.micro_per_epoch]}
        return self._cache[epoch]

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the micro-batches of example indices) for optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        micro = self._epoch(epoch)
        return epoch, micro[within * self.grad_accum : (within + 1) * self.grad_accum]


def total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    return cfg.training.max_steps or cfg.training.epochs * plan.steps_per_epoch


class MetricsLog:
    """``metrics.jsonl`` in the run directory (one JSON object per line) plus accelerate trackers."""

    def __init__(self, path: Path, accelerator, *, keep_until_step: int | None = None):
        self.path = path
        self.accelerator = accelerator
        if keep_until_step is not None and path.exists():  # resume: drop rows past the checkpoint
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


@contextlib.contextmanager
def _hold_interrupt():
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


def _sum_over_processes(accelerator, acc: dict[str, float], n: int, tokens: int) -> tuple[dict, int, int]:
    """Example-weighted metric sums, example and token counts summed over all processes (so the logged
    metrics are the global batch's, not the main process's share)."""
    if accelerator.num_processes == 1:
        return acc, n, tokens
    keys = sorted(acc)
    local = torch.tensor([float(n), float(tokens)] + [acc[k] for k in keys], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    return dict(zip(keys, total[2:].tolist())), int(total[0]), int(total[1])


def _weighted_mean(acc: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / max(n, 1) for k, v in acc.items()}


def evaluate(model, compute: Compute, make_batch, n: int, batch_size: int) -> dict[str, float]:
    """Example-weighted means of ``compute``'s metrics over all n examples, without gradients."""
    was_training = model.training
    model.eval()
    acc: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            _, metrics = compute(model, make_batch(idx))
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + v * len(idx)
    model.train(was_training)
    return _weighted_mean(acc, n)


def fit(
    cfg: TrainConfig,
    *,
    accelerator,
    model,
    tokenizer,
    n_train: int,
    make_batch: Callable[[list[int]], dict],
    compute: Compute,
    run_dir: Path,
    resume_from: Path | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
    log=print,
) -> dict:
    """Train ``model`` in place; returns the last logged train metrics."""
    from transformers import get_scheduler

    t = cfg.training
    plan = StepPlan(
        n_train, t.batch_size, t.grad_accum, t.seed, accelerator.num_processes, accelerator.process_index
    )
    n_steps = total_steps(cfg, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.adam_betas)
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=n_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint_state(resume_from, optimizer=optimizer, scheduler=scheduler)["step"]
        log(f"resumed from {resume_from} at step {start_step}/{n_steps}")
    metrics_log = MetricsLog(Path(run_dir) / "metrics.jsonl", accelerator, keep_until_step=start_step)
    bar = tqdm(
        total=n_steps,
        initial=start_step,
        desc=cfg.method,
        disable=not (t.progress and accelerator.is_main_process),
    )
    model.train()
    last: dict = {}
    completed = start_step  # optimizer steps whose update is applied
    try:
        for step in range(start_step, n_steps):
            began = time.perf_counter()
            epoch, micro = plan.step(step)
            n_examples = sum(len(m) for m in micro)
            acc: dict[str, float] = {}
            tokens = 0
            for i, indices in enumerate(micro):
                batch = make_batch(indices)
                tokens += int(batch["attention_mask"].sum())
                sync = i == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    losses, metrics = compute(model, batch)  # losses: (B,)
                    accelerator.backward(losses.sum() / n_examples)
                for k, v in metrics.items():
                    acc[k] = acc.get(k, 0.0) + v * len(indices)
            if t.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])
                )
            lr = scheduler.get_last_lr()[0]
            with _hold_interrupt():
                optimizer.step()
                scheduler.step()
                completed = step + 1
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            acc, n_examples, tokens = _sum_over_processes(accelerator, acc, n_examples, tokens)
            row = {"step": step + 1, "split": "train", "epoch": epoch, **_weighted_mean(acc, n_examples)}
            row.update(lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens / elapsed, examples=n_examples)
            last = row
            if (step + 1) % t.log_every == 0 or step + 1 == n_steps:
                metrics_log.write(row)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}"
            )
            if eval_fn is not None and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < n_steps:
                metrics_log.write({"step": step + 1, "split": "eval", **eval_fn(model)})
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < n_steps:
                _save(
                    run_dir, step + 1, accelerator, model, tokenizer, optimizer, scheduler, t.keep_checkpoints
                )
            if on_step_end is not None:
                on_step_end(step + 1, row)
    except KeyboardInterrupt:
        if completed > start_step:
            path = _save(
                run_dir, completed, accelerator, model, tokenizer, optimizer, scheduler, t.keep_checkpoints
            )
            log(f"\ninterrupted: saved {path}; continue with --resume")
        bar.close()
        raise
    bar.close()
    if eval_fn is not None:
        metrics_log.write({"step": n_steps, "split": "eval", **eval_fn(model)})
    return last


def _save(run_dir, step, accelerator, model, tokenizer, optimizer, scheduler, keep) -> Path | None:
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
        state={},
        keep=keep,
    )


__all__ = ["StepPlan", "fit", "evaluate", "latest_checkpoint", "total_steps"]
