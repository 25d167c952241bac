"""The step protocol both loops share (training/harness.py), on a one-parameter model with one process: which
step a stop checkpoints, what a non-finite step says, and what runs after the last step. The loops' own
behaviour through it (resume == uninterrupted, the records named, 2 processes == 1) is in test_training.py,
test_faults.py, test_grpo.py, test_ppo.py and test_multiprocess.py."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import preftune.training.harness as harness
from preftune.rewards import RewardError
from preftune.training.engine import NonFiniteError
from preftune.training.harness import StepHarness
from preftune.training.signals import StopSignals

N_STEPS = 5


class OneProcess:
    """What the harness asks of accelerate's ``Accelerator``, for one CPU process."""

    num_processes, process_index, is_main_process = 1, 0, True
    scaler, optimizer_step_was_skipped, trackers = None, False, []

    def prepare(self, model, optimizer):
        return model, optimizer

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def make(tmp_path, monkeypatch, saves, **training):
    t = dict(
        learning_rate=0.1, weight_decay=0.0, adam_betas=[0.9, 0.999], lr_scheduler="constant", warmup_steps=0,
        max_grad_norm=1.0, skip_nonfinite=False, log_every=1, eval_every=0, save_every=0, keep_checkpoints=2,
        progress=False,
    )  # fmt: skip
    cfg = SimpleNamespace(method="toy", training=SimpleNamespace(**{**t, **training}))
    monkeypatch.setattr(
        harness, "save_state", lambda run_dir, step, *args, extra=None: saves.append((step, args[-1])) or step
    )
    model = torch.nn.Linear(1, 1, bias=False)
    signals, logged = StopSignals(), []
    h = StepHarness(
        cfg, accelerator=OneProcess(), model=model, tokenizer=None, run_dir=tmp_path, signals=signals,
        n_steps=N_STEPS, params=list(model.parameters()), state=lambda: {"extra": 7}, log=logged.append,
    )  # fmt: skip
    return h, logged


def body_of(h, fail_at=None, bad=None, finite_at=lambda step: True):
    """A step: one backward, one update; ``fail_at``: raise ``bad`` before (``"before"``) or inside
    (``"inside"``) that step's update."""

    def body(step: int) -> dict:
        if fail_at == (step, "before"):
            raise bad
        (h.model.weight.sum() * 2.0).backward()
        then = None
        if fail_at == (step, "inside"):

            def then():
                raise bad

        outcome = h.update(step, finite_at(step), lambda: "prompts p.jsonl line 3. Look at them", then=then)
        return {"step": step + 1, "split": "train", "loss": 1.0, "grad_norm": outcome.grad_norm}

    return body


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad", [KeyboardInterrupt(), RewardError("the reward fell over")])
def test_a_stop_between_steps_checkpoints_the_last_completed_step(tmp_path, monkeypatch, bad):
    saves: list = []
    h, logged = make(tmp_path, monkeypatch, saves)
    with pytest.raises(type(bad)):
        h.run(body_of(h, fail_at=(2, "before"), bad=bad), postfix=lambda row: {})
    assert [step for step, _ in saves] == [2]  # steps 1 and 2 were applied
    state = saves[0][1]
    assert state["extra"] == 7 and state["nonfinite_skipped"] == 0  # the loop's state beside the counters
    assert logged == [f"\nstopped ({type(bad).__name__}): saved 2; continue with --resume"]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


def test_a_stop_at_the_first_step_or_inside_an_update_writes_no_checkpoint(tmp_path, monkeypatch):
    saves: list = []
    h, _ = make(tmp_path, monkeypatch, saves)
    with pytest.raises(KeyboardInterrupt):
        h.run(body_of(h, fail_at=(0, "before"), bad=KeyboardInterrupt()), postfix=lambda row: {})
    assert saves == []  # nothing completed: nothing to save
    h, logged = make(tmp_path, monkeypatch, saves)
    with pytest.raises(KeyboardInterrupt):  # inside step 3's update: that step is half applied
        h.run(body_of(h, fail_at=(2, "inside"), bad=KeyboardInterrupt()), postfix=lambda row: {})
    assert saves == [] and h.completed == 2 and not h.consistent
    assert "stopped at once (KeyboardInterrupt): no checkpoint written now" in logged[0]


def test_a_nonfinite_step_names_it_and_its_records_after_checkpointing_the_one_before(tmp_path, monkeypatch):
    saves: list = []
    h, _ = make(tmp_path, monkeypatch, saves)
    weights = []
    with pytest.raises(NonFiniteError) as info:
        h.run(
            body_of(h, finite_at=lambda step: step != 3),
            postfix=lambda row: {},
            on_step_end=lambda step, row: weights.append(h.model.weight.item()),
        )
    assert str(info.value) == (
        "step 4: non-finite loss (grad_norm=2.0); prompts p.jsonl line 3. Look at them, or set "
        "training.skip_nonfinite: true to skip such steps"
    )
    assert [step for step, _ in saves] == [3] and h.completed == 3 and h.consistent
    assert h.model.weight.grad is None  # the bad step's gradients were dropped, nothing applied
    assert h.model.weight.item() == weights[-1]


def test_after_the_last_step_the_final_evaluation_and_finish_run_with_signals_held(tmp_path, monkeypatch):
    saves: list = []
    h, _ = make(tmp_path, monkeypatch, saves, log_every=2, eval_every=2, save_every=3)
    held = []
    last = h.run(
        body_of(h),
        postfix=lambda row: {"loss": f"{row['loss']:.1f}"},
        evaluate=lambda: {"score": float(len(held))},
        finish=lambda: held.append(h.signals._deferring),
    )
    assert held == [True]
    assert last["step"] == N_STEPS and not math.isnan(last["grad_norm"])
    logged = [(r["step"], r["split"]) for r in rows(tmp_path)]
    # rows every 2 steps and at the last; evaluations every 2 steps but the last, then the final one
    assert logged == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval"), (5, "train"), (5, "eval")]
    assert [step for step, _ in saves] == [3]  # periodic only: the last step is the caller's final save
