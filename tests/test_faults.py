"""Faults and bad input: SIGTERM behaves like Ctrl-C, a resumed run restores the RNG (LoRA dropout draws
from it), NaN losses stop the run naming the records (or are skipped on request), a failing checkpoint
write keeps the previous checkpoint resumable, files that are not UTF-8 are refused with file and line,
dropped pairs are named, and the API takes any form of config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import make_cfg, metrics, pair_records, quiet, raw_config, weights, write_jsonl

import preftune
from preftune.cli import main
from preftune.data import DataError
from preftune.training import train
from preftune.training.engine import NonFiniteError
from preftune.training.pairs import PairFamily
from preftune.training.signals import StopSignals, Terminated, stop_signals


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))


def _ckpts(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# --- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data):
    sections = {"training": {"max_steps": 4}}
    plain = train(make_cfg(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "b", **sections)

    def term(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(cfg, on_step_end=term, log=quiet)
    assert _ckpts(tmp_path / "b") == ["step-0000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards
    train(cfg, resume=True, log=quiet)
    wa, wb = weights(plain / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _stop_at(step_to_stop: int):
    def stop(step, row):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return stop


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_resume_with_lora_dropout_equals_uninterrupted(tmp_path, tiny_model_dir, data, method, monkeypatch):
    """LoRA dropout draws from the global RNG at every training forward: a resumed run equals the
    uninterrupted one only if the checkpoint restores that RNG."""
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.3}
    sections = {"model": {"lora": lora}, "training": {"max_steps": 4, "save_every": 2, "learning_rate": 1e-2}}
    if method == "grpo":
        reward = "def by_ids(prompts, completions, completion_ids):\n    return [sum(c) % 7 for c in completion_ids]\n"
        (tmp_path / "fault_rewards.py").write_text(reward)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "fault_rewards", raising=False)
        prompts = write_jsonl(
            tmp_path / "prompts.jsonl", [{"prompt": f"The movie {i} was"} for i in range(8)]
        )
        sections.update(
            method="grpo",
            data={"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
            generation={"max_new_tokens": 6},
            grpo={"completions_per_prompt": 4, "prompts_per_batch": 2, "rewards": ["fault_rewards:by_ids"]},
        )

    def cfg(out, dropout=lora["dropout"]):
        return preftune.load_config(
            raw_config(
                tiny_model_dir,
                data,
                tmp_path / out,
                **{**sections, "model": {"lora": {**lora, "dropout": dropout}}},
            )
        )

    plain = train(cfg("a"), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("b"), on_step_end=_stop_at(2), log=quiet)
    train(cfg("b"), resume=True, log=quiet)
    name = "adapter_model.safetensors"
    wa, wb = (load_file(run / "model" / name) for run in (plain, tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in metrics(plain)] == [r["loss"] for r in metrics(tmp_path / "b")]
    # the dropout is live: without it the run ends elsewhere (so the equality above is not vacuous)
    w0 = load_file(train(cfg("c", dropout=0.0), log=quiet) / "model" / name)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)


def test_signals_are_deferred_to_the_step_boundary_and_a_second_one_stops_at_once():
    with stop_signals() as signals:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # recorded, not raised
            done = "went on"
            assert isinstance(signals.requested(), Terminated)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # a second signal: at once
        with pytest.raises(Terminated):  # outside the steps: at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert done == "went on" and StopSignals().requested() is None


def test_a_signal_inside_the_optimizer_step_checkpoints_that_step(
    tmp_path, tiny_model_dir, data, monkeypatch
):
    """The stop waits for the step, so the checkpoint holds exactly the state after it (not one step more)."""
    from preftune.training.engine import Stepper

    sections = {"training": {"max_steps": 4}}
    plain = train(make_cfg(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    real_step = Stepper.step

    def step_then_signal(self, finite_loss=True):
        outcome = real_step(self, finite_loss)
        if self.scheduler.last_epoch == 2:  # the second step was just applied
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    monkeypatch.setattr(Stepper, "step", step_then_signal)
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "b", **sections)
    with pytest.raises(Terminated):
        train(cfg, log=quiet)
    monkeypatch.setattr(Stepper, "step", real_step)
    assert _ckpts(tmp_path / "b") == ["step-0000002"]
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2]  # the step's row was written too
    train(cfg, resume=True, log=quiet)
    wa, wb = weights(plain / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_to_the_cli_exits_nonzero_with_a_checkpoint(tmp_path, tiny_model_dir, data):
    raw = raw_config(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 100000})
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "preftune.cli", "train", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "--resume" in err + _
    (ckpt,) = _ckpts(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / ckpt / "trainer_state.json").is_file()


# --- non-finite losses -----------------------------------------------------------------------------------


def _poison(monkeypatch, example_index: int):
    """Make the loss of one example NaN (as a record with absurd values would)."""
    real = PairFamily.compute

    def compute(self, model, batch):
        losses, metrics_ = real(self, model, batch)
        bad = batch["index"].to(losses.device) == example_index
        return torch.where(bad, torch.full_like(losses, float("nan")), losses), metrics_

    monkeypatch.setattr(PairFamily, "compute", compute)


def test_nan_loss_stops_naming_the_record_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, data, monkeypatch
):
    from preftune.training.loop import StepPlan

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "r", training={"max_steps": 4, "batch_size": 2})
    _, micro = StepPlan(8, 2, 1, 0).step(2)  # the pairs of step 3
    _poison(monkeypatch, micro[0][1])
    with pytest.raises(NonFiniteError) as info:
        train(cfg, log=quiet)
    line = micro[0][1] + 1  # examples are the file's lines in order
    assert "step 3: non-finite loss" in str(info.value)
    assert f"pairs.jsonl line {line}" in str(info.value) and "skip_nonfinite" in str(info.value)
    assert _ckpts(tmp_path / "r") == ["step-0000002"]  # the state before the bad step
    assert not (tmp_path / "r" / "model").exists()


def test_skip_nonfinite_skips_the_step_and_counts_it(tmp_path, tiny_model_dir, data, monkeypatch):
    import preftune.training.run as run_module
    from preftune.training.loop import StepPlan

    sections = {"training": {"max_steps": 4, "batch_size": 2, "skip_nonfinite": True}}
    _, micro = StepPlan(8, 2, 1, 0).step(2)
    _poison(monkeypatch, micro[0][0])
    models, snapshots = [], {}
    real_fit = run_module.fit

    def fit(cfg, **kw):  # keep a handle on the model to snapshot its weights after every step
        models.append(kw["model"])
        return real_fit(cfg, **kw)

    def snapshot(step, row):
        snapshots[step] = {k: v.clone() for k, v in models[0].state_dict().items()}

    monkeypatch.setattr(run_module, "fit", fit)
    run = train(make_cfg(tiny_model_dir, data, tmp_path / "s", **sections), on_step_end=snapshot, log=quiet)
    assert [r["nonfinite_skipped"] for r in metrics(run)] == [0, 0, 1, 1]
    assert all(torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2])  # step 3: no update
    assert any(not torch.equal(snapshots[3][k], snapshots[4][k]) for k in snapshots[3])  # step 4 trains


# --- failing writes --------------------------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_one_resumable(
    tmp_path, tiny_model_dir, data, monkeypatch
):
    import preftune.training.checkpoint as checkpoint

    sections = {"training": {"max_steps": 4, "save_every": 1, "keep_checkpoints": 1}}
    plain = train(make_cfg(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    real_save = checkpoint.torch.save
    calls = []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # optimizer.pt of the second checkpoint
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "b", **sections)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, log=quiet)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    run = tmp_path / "b"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001"]  # no partial folder
    train(cfg, resume=True, log=quiet)
    wa, wb = weights(plain / "model"), weights(run / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, suffix):
    from preftune.data import load_rows

    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if suffix == ".csv":
        body = b"prompt,chosen,rejected\np,a,b\np,caf\xe9,b\n"
    elif suffix == ".json":
        body = b'[\n{"prompt": "p", "chosen": "a", "rejected": "b"},\n{"prompt": "caf\xe9"}\n]\n'
    else:
        body = (json.dumps(good) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(body)
    line = 3 if suffix != ".jsonl" else 2
    with pytest.raises(DataError, match=rf"latin1{suffix} line {line}: not valid UTF-8 \(byte 0xe9"):
        load_rows(path)


def test_validate_names_dropped_pairs(tmp_path, tiny_model_dir, capsys):
    rows = pair_records(4)
    rows[2]["rejected"] = rows[2]["chosen"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config(tiny_model_dir, data, tmp_path / "run")))
    assert main(["validate", str(config), "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "1 of 4 pairs dropped" in out and "pairs.jsonl line 3: dropped, chosen and rejected" in out


def test_every_api_accepts_a_dict_a_path_or_a_config(tmp_path, tiny_model_dir, data):
    raw = raw_config(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    from_path = preftune.load_config(path, ["dpo.beta=0.3"])
    from_dict = preftune.load_config(raw, ["dpo.beta=0.3"])
    from_cfg = preftune.load_config(preftune.load_config(raw), ["dpo.beta=0.3"])
    assert from_path == from_dict == from_cfg and from_dict.dpo.beta == 0.3
    assert preftune.validate(raw, load_weights=False)["train_pairs"] == 8
    assert preftune.validate(path, load_weights=False, num_processes=2)["pairs_per_step"] == 2 * 2
    run = preftune.train(raw, log=quiet)
    assert load_file(run / "model" / "model.safetensors")
    with pytest.raises(preftune.config.ConfigError, match="not int"):
        preftune.load_config(3)


# --- review findings -------------------------------------------------------------------------------------


def test_huge_but_finite_losses_keep_metrics_valid_json(tmp_path, tiny_model_dir):
    rows = pair_records(4)
    for r in rows:
        r["margin"] = 1e300  # float64 loss ~1e300: finite, though no float32 holds it
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = preftune.load_config(
        {**raw_config(tiny_model_dir, data, tmp_path / "rm"), "method": "reward_model"}
    )
    run = train(cfg, log=quiet)
    rows_out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert rows_out[0]["loss"] == pytest.approx(1e300, rel=1e-6)
    assert json.loads((run / "result.json").read_text())["final_train_metrics"]["loss"] > 1e299


def test_resume_with_another_number_of_processes_is_refused(tmp_path, tiny_model_dir, data):
    from preftune.training import RunDirError

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "r", training={"max_steps": 4, "save_every": 2})

    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    state_file = tmp_path / "r" / "checkpoints" / "step-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(RunDirError, match="written by a run with 2 process"):
        train(cfg, resume=True, log=quiet)


def test_a_torn_metrics_line_does_not_block_resume_and_a_complete_run_says_so(tmp_path, tiny_model_dir, data):
    from preftune.training import RunDirError

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "r", training={"max_steps": 4, "save_every": 2})

    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tr')  # killed while appending
    train(cfg, resume=True, log=quiet)
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 3, 4]
    with pytest.raises(RunDirError, match="is complete"):
        train(cfg, resume=True, log=quiet)


def test_a_config_object_is_checked_like_a_file(tmp_path, tiny_model_dir, data):
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "r")
    cfg.training.batch_size = 0
    with pytest.raises(preftune.config.ConfigError, match="batch_size must be >= 1"):
        train(cfg, log=quiet)
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "r")
    cfg.model.dtype = "bfloat16"
    with pytest.raises(preftune.config.ConfigError, match="mixed_precision"):
        preftune.validate(cfg, load_weights=False)
    fp16 = make_cfg(tiny_model_dir, data, tmp_path / "r", training={"mixed_precision": "fp16"})
    if not torch.cuda.is_available():
        with pytest.raises(preftune.config.ConfigError, match="fp16 needs a CUDA GPU"):
            preftune.validate(fp16, load_weights=False)


def test_bad_numbers_and_ids_are_named(tmp_path):
    from preftune.data import validate_rows

    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 10**400, "score_rejected": 1, "_source": "f line 1"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "prompt_ids": [1], "chosen_ids": [True, False],
         "rejected_ids": [3], "_source": "f line 2"},
    ]  # fmt: skip
    with pytest.raises(DataError) as info:
        validate_rows(rows)
    assert "f line 1: field 'score_chosen': must be finite" in str(info.value)
    assert "f line 2: field 'chosen_ids': must be a list of non-negative token ids" in str(info.value)


def test_split_by_prompt_passes_over_a_group_that_would_overshoot():
    from preftune.data import split_rows

    rows = [{"prompt": "big", "chosen": "a", "rejected": f"b{i}"} for i in range(30)]
    rows += [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    sizes = {len(split_rows(rows, eval_fraction=0.2, seed=s)[1]) for s in range(8)}
    assert sizes == {10}  # the 30-row group never fits a target of 10; ten small ones do
