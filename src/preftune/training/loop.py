"""The offline loop, shared by the pair methods and the reward model: fixed examples, epochs, accumulation.

A family supplies ``make_batch(indices) -> batch`` and ``compute(model, batch) -> (losses (B,), metrics)``;
this loop owns ordering, accumulation and evaluation; the protocol around each step (optimizer step,
schedule, metrics log, checkpoints, stops) is ``harness.py``'s, shared with the online loop.

Ordering is a pure function of (seed, epoch): epoch e visits ``randperm(n, seed + e)`` in micro-batches of
``batch_size * world_size`` pairs (rank r takes every world-th pair), and ``grad_accum`` consecutive
micro-batches make one optimizer step. The step loss is the sum of per-example losses divided by the
number of examples in the step over all processes, so batch 4 × accumulation 1, batch 1 × accumulation 4
and 2 processes × batch 2 take the same step (also when the last micro-batch splits unevenly over the
processes), and a resumed run replays exactly the batches an uninterrupted one would.

``training.max_tokens_per_batch: N`` keeps the records of every micro-batch and splits a rank's share into
forward/backward passes of at most N padded tokens (:func:`token_chunks`, rows × longest row as the layout
runs them); every pass adds its examples' losses over the same step count, so the step is the same in any
chunking. All ranks run the same number of passes (the largest; zero-weight stand-ins fill the rest), since
under FSDP every forward is collective; only the last pass reduces the gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..losses import example_mean
from .engine import max_over_processes, sum_over_processes
from .harness import StepHarness
from .signals import StopSignals

LENGTH_WINDOW = 50  # micro-batches per length-sorted window (as transformers' group_by_length)

Compute = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StepPlan:
    """Which examples each optimizer step visits, on each process.

    Epoch e visits ``randperm(n, seed + e)`` in global micro-batches of ``batch_size * world_size``; rank r
    takes every world-th example of each. The last micro-batch of an epoch may be short: a rank whose share
    is empty runs a zero-weight stand-in, so every rank takes the same steps and no example is dropped.
    ``drop_last`` (online prompts) drops an epoch's incomplete last micro-batch instead, so every rank's share
    of every batch is full; each epoch reshuffles all n, so the dropped examples join the next epoch's order
    and which ones wait changes from epoch to epoch (none is left out systematically). With
    ``lengths`` (``training.group_by_length``), each window of :data:`LENGTH_WINDOW` micro-batches of the
    shuffled order is sorted by length, longest first, so a micro-batch pads little; still a pure function of
    (seed, epoch), so resume replays it.
    """

    n: int
    batch_size: int
    grad_accum: int
    seed: int
    world_size: int = 1
    rank: int = 0
    drop_last: bool = False
    lengths: Sequence[int] | None = None  # group by length: sort windows of 50 micro-batches by these
    _cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.drop_last and self.n < self.batch_size * self.world_size:
            raise ValueError(
                f"{self.n} examples make no full batch of {self.batch_size} × {self.world_size} processes"
            )

    @property
    def micro_per_epoch(self) -> int:
        size = self.batch_size * self.world_size
        return self.n // size if self.drop_last else math.ceil(self.n / size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            size = self.batch_size * self.world_size
            if self.lengths is not None:  # like group_by_length: similar lengths share a micro-batch
                window = LENGTH_WINDOW * size
                perm = [
                    i
                    for start in range(0, self.n, window)
                    for i in sorted(perm[start : start + window], key=lambda i: -self.lengths[i])
                ]
            micro = [perm[i : i + size][self.rank :: self.world_size] for i in range(0, self.n, size)]
            self._cache = {epoch: micro[: self.micro_per_epoch]}
        return self._cache[epoch]

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, this rank's micro-batches of example indices) for optimizer step ``step`` (0-based); a
        micro-batch can be empty on some ranks at the end of an epoch."""
        epoch, within = divmod(step, self.steps_per_epoch)
        micro = self._epoch(epoch)
        return epoch, micro[within * self.grad_accum : (within + 1) * self.grad_accum]

    def state(self) -> dict:
        """Nothing for a checkpoint: the plan is a pure function of (seed, epoch), replayed on resume (a
        streamed plan, :class:`~preftune.data.stream.StreamPlan`, keeps its stream position here)."""
        return {}

    def restore(self, trainer_state: dict) -> None:
        """Nothing to restore (see :meth:`state`)."""

    def step_examples(self, step: int) -> int:
        """Examples in optimizer step ``step`` over all ranks: the denominator of the step's mean loss (a
        last micro-batch can split unevenly over ranks, so no rank can use its own count)."""
        within = step % self.steps_per_epoch
        size = self.batch_size * self.world_size
        first, last = within * self.grad_accum, min((within + 1) * self.grad_accum, self.micro_per_epoch)
        return sum(min(size, self.n - j * size) for j in range(first, last))


def token_chunks(
    indices: Sequence[int], rows: Callable[[int], tuple[int, int]], limit: int
) -> list[list[int]]:
    """``indices`` (one rank's micro-batch share) in passes of at most ``limit`` padded tokens.

    ``rows(i)`` = (rows, row length) example i adds to a batch, as the layout pads it (a pair without prefix
    sharing: 2 rows of prompt + the longer response; with it, one packed row of prompt + both responses). A
    pass costs (its rows) × (its longest row) tokens. The share is sorted by row length, longest first (ties in
    their order), so each pass pads little, and cut greedily; a record longer than ``limit`` alone runs alone.
    """
    shapes = {i: rows(i) for i in indices}
    order = sorted(indices, key=lambda i: -shapes[i][1])
    chunks: list[list[int]] = []
    n_rows = 0
    for i in order:
        if chunks and (n_rows + shapes[i][0]) * shapes[chunks[-1][0]][1] <= limit:
            chunks[-1].append(i)
            n_rows += shapes[i][0]
        else:
            chunks.append([i])
            n_rows = shapes[i][0]
    return chunks


def padded_tokens(indices: Sequence[int], rows: Callable[[int], tuple[int, int]]) -> int:
    """Tokens a batch of ``indices`` runs, padding included: its rows × its longest row."""
    shapes = [rows(i) for i in indices]
    return sum(r for r, _ in shapes) * max((n for _, n in shapes), default=0)


def total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    return cfg.training.max_steps or cfg.training.epochs * plan.steps_per_epoch


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
    signals: StopSignals,
    resume_from: Path | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    on_step_end: Callable[[int, dict], None] | None = None,
    describe: Callable[[list[int]], list[str]] | None = None,
    lengths: Sequence[int] | None = None,
    rows: Callable[[int], tuple[int, int]] | None = None,
    begin_micro: Callable[[torch.nn.Module, list[int]], None] | None = None,
    plan=None,
    log=print,
) -> dict:
    """Train ``model`` in place; returns the last logged train metrics.

    ``describe(indices)`` names examples (file and line) in errors: a non-finite loss or gradient norm stops
    the run naming the step and its records, after checkpointing the last completed step (or, with
    ``training.skip_nonfinite``, skips the step and counts it in ``nonfinite_skipped``). A signal stops the
    run after the current step, with a checkpoint of it (``signals.py``). ``rows(i)``: the (rows, row length)
    example i adds to a batch (:func:`token_chunks`), required with ``training.max_tokens_per_batch``; then
    ``begin_micro(model, share)`` (if given) runs before each micro-batch's passes, for what a family computes
    over the whole micro-batch (KTO's reference point).
    """
    t = cfg.training
    world = accelerator.num_processes
    if plan is None:  # (a streamed run passes its own plan: data/stream.py)
        plan = StepPlan(
            n_train, t.batch_size, t.grad_accum, t.seed, world, accelerator.process_index,
            lengths=lengths if t.group_by_length else None,
        )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    h = StepHarness(
        cfg, accelerator=accelerator, model=model, tokenizer=tokenizer, run_dir=run_dir, signals=signals,
        n_steps=total_steps(cfg, plan), params=params, resume_from=resume_from, log=log,
        state=plan.state, on_restore=plan.restore,  # a stream's position (data/stream.py)
    )  # fmt: skip
    model = h.model
    limit = t.max_tokens_per_batch
    if limit is not None and rows is None:
        raise ValueError("training.max_tokens_per_batch needs the examples' rows (fit(rows=...))")
    warned: list[bool] = []

    def passes(share: list[int]) -> list[list[int]]:
        """One micro-batch's forward/backward passes on this rank: its share cut to the token limit, as many as
        on the rank that needs most (the others: zero-weight stand-ins)."""
        if limit is None:
            return [share]
        if begin_micro is not None:  # what spans the whole micro-batch (KTO's reference point)
            with accelerator.autocast():
                begin_micro(model, share or [0])  # [0]: the unlimited loop's stand-in for an empty share
        cut = token_chunks(share, rows, limit) or [[]]  # an empty share: one stand-in pass
        if not warned and any(len(c) == 1 and padded_tokens(c, rows) > limit for c in cut):
            warned.append(True)
            log(
                f"warning: a record is longer than training.max_tokens_per_batch ({limit} padded tokens): it "
                "runs alone in its pass (this warning is shown once)"
            )
        if world > 1:  # the same number of passes on every rank: under FSDP every forward is collective
            most = int(max_over_processes(accelerator, {"passes": len(cut)})["passes"])
            cut += [[]] * (most - len(cut))
        return cut

    def body(step: int) -> dict:
        began = time.perf_counter()
        epoch, micro = plan.step(step)
        n_step = plan.step_examples(step)  # over all ranks
        n_local = sum(len(m) for m in micro)
        acc: dict[str, float] = {}
        tokens, bad = 0, []
        # a zero-weight stand-in: the step's shortest record of this rank under a token limit (else the first)
        ours = [i for m in micro for i in m]
        standin = min(ours, key=lambda i: padded_tokens([i], rows)) if limit is not None and ours else 0
        for j, share in enumerate(micro):
            cut = passes(share)
            for i, indices in enumerate(cut):
                weight = 1.0 if indices else 0.0  # an empty share (end of an epoch): a zero-weight stand-in
                batch = make_batch(indices or [standin])
                tokens += int(batch["attention_mask"].sum() * weight)
                sync = j == len(micro) - 1 and i == len(cut) - 1  # only the step's last pass reduces
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    losses, metrics = compute(model, batch)  # losses: (B,)
                    # DDP averages gradients over ranks, so each rank's share is scaled by world size
                    accelerator.backward(example_mean(losses, n_step) * world * weight)
                bad += [idx for idx, ok in zip(indices, torch.isfinite(losses.detach()).tolist()) if not ok]
                for k, v in metrics.items():
                    acc[k] = acc.get(k, 0.0) + v * len(indices)
        any_bad = sum_over_processes(accelerator, {"bad": float(len(bad))})["bad"] > 0

        def records() -> str:
            named = bad or [i for m in micro for i in m]
            names = describe(named) if describe is not None else [f"example {i}" for i in named]
            shown = "; ".join(names[:10]) + (f"; ... ({len(names)} in all)" if len(names) > 10 else "")
            which = "with a non-finite loss" if bad else "in the step"
            return f"records {which}: {shown}. Fix or drop them, lower the learning rate"

        outcome = h.update(step, not any_bad, records)
        elapsed = time.perf_counter() - began
        acc = sum_over_processes(accelerator, {**acc, "_examples": n_local, "_tokens": tokens})
        n_examples, tokens = int(acc.pop("_examples")), int(acc.pop("_tokens"))
        row = {"step": step + 1, "split": "train", "epoch": epoch, **_weighted_mean(acc, n_examples)}
        row.update(lr=outcome.lr, grad_norm=outcome.grad_norm, tokens_per_s=tokens / elapsed)
        return {**row, "examples": n_examples, **h.stepper.metrics()}

    return h.run(
        body,
        postfix=lambda r: {
            "loss": f"{r['loss']:.4f}",
            **({"acc": f"{r['rewards/accuracies']:.2f}"} if "rewards/accuracies" in r else {}),  # not KTO's
        },
        evaluate=(lambda: eval_fn(model)) if eval_fn is not None else None,
        on_step_end=on_step_end,
    )


__all__ = ["StepPlan", "evaluate", "fit", "padded_tokens", "token_chunks", "total_steps"]
