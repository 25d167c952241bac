"""The step protocol both loops share: what happens around a step's forward and backward passes.

The offline loop (``loop.fit``) and the online loop (``online.train_online``) differ only in what one step
computes; everything around it is :class:`StepHarness`::

    harness = StepHarness(cfg, ...)     # optimizer and schedule, accelerator.prepare, resume, metrics log
    def body(step):                     # the loop's own step: forward and backward passes, then
        outcome = harness.update(step, finite, describe)   # one guarded optimizer step
        return row                      # the step's train row
    last = harness.run(body, evaluate=...)

``run`` holds signals while the steps run (``signals.py``), and after each step logs its row, evaluates and
checkpoints when due, calls back and stops when every process agrees to (``engine.end_of_step``). A
non-finite step raises :class:`NonFiniteError` naming the step and its records (``describe``); a stop (a
signal, a non-finite step, a reward function's error) checkpoints the last completed step when that is
safe (``engine.stop_checkpoint``) and re-raises. At the end: the final evaluation, held like the final save.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..config import TrainConfig
from ..rewards import RewardError
from .embedding_grad import use_index_grad_embedding
from .engine import (
    MetricsLog,
    NonFiniteError,
    StepOutcome,
    Stepper,
    build_optimizer,
    end_of_step,
    save_state,
    stop_checkpoint,
)
from .sharding import checkpoint_state, is_sharded, restore_checkpoint, save_checkpoint
from .signals import StopSignals

SKIP_HINT = "or set training.skip_nonfinite: true to skip such steps"


class StepHarness:
    """One run's optimizer, schedule, resume, metrics log and checkpoints, and the protocol around its steps.

    ``params``: what is clipped and stepped (the model's trainable parameters and a method's own, e.g. PPO's
    value head); ``groups``: the optimizer's parameter groups (``params`` by default). On resume the
    optimizer, schedule, RNG and counters come back from ``resume_from`` and ``on_restore(state)`` gets the
    checkpoint's trainer state for what the loop keeps beside them. A checkpoint holds the model, optimizer,
    schedule and counters, plus ``state()`` in its trainer state and whatever ``files(step)`` returns
    writes into its folder (``files`` is called first, on every process: it may be collective).

    After construction ``model`` is the prepared model (train with it), ``start_step`` the first step to run
    and ``metrics_log`` the run's ``metrics.jsonl`` (trimmed to ``start_step`` on resume).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        accelerator,
        model,
        tokenizer,
        run_dir: Path,
        signals: StopSignals,
        n_steps: int,
        params: list,
        groups: list | None = None,
        resume_from: Path | None = None,
        on_restore: Callable[[dict], None] | None = None,
        state: Callable[[], dict] | None = None,
        files: Callable[[int], Callable[[Path], None] | None] | None = None,
        log=print,
    ) -> None:
        t = cfg.training
        self.cfg, self.t, self.accelerator, self.tokenizer = cfg, t, accelerator, tokenizer
        self.run_dir, self.signals, self.n_steps, self.log = Path(run_dir), signals, n_steps, log
        self._state, self._files = state, files
        optimizer, self.scheduler = build_optimizer(t, params if groups is None else groups, n_steps)
        self.sharded = is_sharded(model)  # training.sharding: fsdp (sharding.py)
        if self.sharded:  # FSDP2 reduces the gradients itself: no DDP wrapper
            self.model, self.optimizer = model, accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if self.sharded or accelerator.num_processes == 1:  # no reducer reads the gradient as it forms
            use_index_grad_embedding(model)  # the tied embedding's rows added by index (embedding_grad.py)
        own = {id(p) for p in model.parameters()}
        self._extra_params = [p for p in params if id(p) not in own]  # a method's own (PPO's value head)
        self.stepper = Stepper(accelerator, self.optimizer, self.scheduler, params, t, sharded=self.sharded)
        self.start_step = 0
        if resume_from is not None:
            load = None
            if self.sharded:
                load = lambda: restore_checkpoint(  # noqa: E731
                    resume_from, cfg=cfg, accelerator=accelerator, model=self.model, optimizer=self.optimizer,
                    scheduler=self.scheduler, extra_params=self._extra_params, log=log,
                )  # fmt: skip
            self.start_step = self.stepper.restore(resume_from, load=load)
            if on_restore is not None:
                on_restore(self.stepper.restored)
            log(f"resumed from {resume_from} at step {self.start_step}/{n_steps}")
        self.metrics_log = MetricsLog(
            self.run_dir / "metrics.jsonl", accelerator, keep_until_step=self.start_step
        )
        # optimizer steps applied, and whether none is half applied (a checkpoint now is the state after them)
        self.completed, self.consistent = self.start_step, True

    def save(self, step: int) -> Path | None:
        """Checkpoint the state after ``step`` (collective; the main process writes and gets the path)."""
        extra = self._files(step) if self._files is not None else None
        state = {**self.stepper.state(), **(self._state() if self._state is not None else {})}
        if self.sharded:  # every process writes its shards
            return save_checkpoint(
                self.run_dir, step, accelerator=self.accelerator, model=self.model, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler, keep=self.t.keep_checkpoints, extra=extra,
                state={**state, **checkpoint_state(self.cfg, self.accelerator.num_processes)},
                extra_params=self._extra_params,
            )  # fmt: skip
        return save_state(
            self.run_dir, step, self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler,
            self.t.keep_checkpoints, state, extra=extra,
        )  # fmt: skip

    def update(
        self, step: int, finite: bool, describe: Callable[[], str], then: Callable[[], None] | None = None
    ) -> StepOutcome:
        """The optimizer step ``step`` (0-based) over the gradients the loop accumulated; ``finite``: every
        loss of the step was finite on every process. A non-finite step (not skipped by
        ``training.skip_nonfinite``) raises :class:`NonFiniteError` "step N: <why>; <describe()>, or set
        training.skip_nonfinite...", with nothing applied. ``then`` runs after the update and before the step
        counts as completed (what moves once per batch of samples)."""
        self.consistent = False
        try:
            outcome = self.stepper.step(finite_loss=finite)
        except NonFiniteError as exc:
            self.consistent = True  # nothing was applied
            raise NonFiniteError(f"step {step + 1}: {exc}; {describe()}, {SKIP_HINT}") from None
        if then is not None:
            then()
        self.completed, self.consistent = step + 1, True
        return outcome

    def run(
        self,
        body: Callable[[int], dict],
        *,
        postfix: Callable[[dict], dict[str, str]],
        evaluate: Callable[[], dict[str, float]] | None = None,
        on_step_end: Callable[[int, dict], None] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> dict:
        """Steps ``start_step`` .. ``n_steps - 1``: ``body(step)`` trains one step (calling :meth:`update`)
        and returns its train row; then the row is logged, ``evaluate()`` and the checkpoint run when due,
        ``on_step_end(step + 1, row)`` is called and an agreed stop is raised (``engine.end_of_step``). At the
        end the final evaluation and ``finish()`` run with signals held (until the caller's final save).
        ``postfix(row)``: the progress bar's fields. Returns the last train row ({} if no step ran)."""
        t, n_steps, acc = self.t, self.n_steps, self.accelerator
        bar = tqdm(
            total=n_steps,
            initial=self.start_step,
            desc=self.cfg.method,
            disable=not (t.progress and acc.is_main_process),
        )
        self.model.train()
        last: dict = {}
        with self.signals.deferred():
            try:
                for step in range(self.start_step, n_steps):
                    row = last = body(step)
                    bar.update(1)
                    bar.set_postfix(**postfix(row))
                    end_of_step(
                        step + 1, n_steps, t, row, metrics_log=self.metrics_log, accelerator=acc,
                        signals=self.signals, evaluate=evaluate, save=self.save, on_step_end=on_step_end,
                    )  # fmt: skip
            except (KeyboardInterrupt, NonFiniteError, RewardError) as exc:
                bar.close()
                if self.completed > self.start_step:
                    completed = self.completed
                    stop_checkpoint(
                        exc, consistent=self.consistent, accelerator=acc, save=lambda: self.save(completed),
                        log=self.log,
                    )  # fmt: skip
                raise
            bar.close()
            if evaluate is not None:  # held until the model is saved (the caller's final phase)
                self.metrics_log.write({"step": n_steps, "split": "eval", **evaluate()})
            if finish is not None:
                finish()
        return last


__all__ = ["StepHarness"]
