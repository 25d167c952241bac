"""Streamed prompts for the online methods (``data.streaming: true`` with grpo, ppo, online_dpo;
data/stream.py's PromptStreamPlan): the batches are the whole-file plan's in the file's order, split over
processes alike; ``--resume`` continues at the exact prompt, also between the updates of one batch of samples;
a bad prompt mid-stream names its line; ``preftune validate`` reads the file once and lists its bad lines."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import quiet, reward_module, rows  # noqa: F401 (reward_module: a fixture)
from test_streaming import two_processes_equal_one

import preftune
import preftune.data.stream as stream_module
import preftune.training.online as online_module
from preftune.cli import main
from preftune.config import ConfigError, train_config_from_dict
from preftune.data import DataError
from preftune.training import train
from preftune.training.prepare import prepare

pytestmark = pytest.mark.usefixtures("reward_module")  # test_grpo's reward module: grpo_rewards:by_ids


def write_prompts(path, lines: list[dict | str]):
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in lines))
    return path


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"The movie {i} was", "answer": "great" if i % 2 else "bad"} for i in range(n)]


def raw(model_dir, prompts, out, method="grpo", streaming=True, **sections) -> dict:
    section = {"grpo": {"completions_per_prompt": 4}, "ppo": {"epochs": 1, "minibatches": 2}}.get(method, {})
    cfg = {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(prompts),
            "max_length": 48,
            "max_prompt_length": 24,
            "streaming": streaming,
            "shuffle_buffer": 4,
        },  # fmt: skip
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "progress": False,
        },  # fmt: skip
        method: {**section, "prompts_per_batch": 2, "rewards": ["grpo_rewards:by_ids"]},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def config(*args, **kwargs):
    return preftune.load_config(raw(*args, **kwargs))


@pytest.fixture
def sampled(monkeypatch):
    """(sampling batch, [file and line of each of its prompts on this process]) of every batch sampled."""
    batches: list[tuple[int, list[str]]] = []
    collect = online_module.collect_rollout

    def recording(**kwargs):
        batches.append((kwargs["batch"], [kwargs["examples"][i].source for i in kwargs["indices"]]))
        return collect(**kwargs)

    monkeypatch.setattr(online_module, "collect_rollout", recording)
    return batches


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grpo", "ppo", "online_dpo"])
def test_online_methods_stream_with_max_steps_and_without_what_needs_the_whole_set(
    tmp_path, tiny_model_dir, method
):
    cfg = raw(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o", method)
    assert train_config_from_dict(cfg).data.streaming
    cfg["training"].pop("max_steps")
    with pytest.raises(ConfigError, match="data.streaming: true needs training.max_steps"):
        train_config_from_dict(cfg)
    cfg = raw(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o", method, data={"eval_fraction": 0.2})
    with pytest.raises(ConfigError, match="data.eval_fraction needs the whole training set"):
        train_config_from_dict(cfg)
    if method == "grpo":
        cfg = raw(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o", grpo={"dynamic_sampling": True})
        with pytest.raises(ConfigError, match="grpo.dynamic_sampling draws its extra prompts from the whole"):
            train_config_from_dict(cfg)


# --- the plan -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_streamed_batches_in_file_order_are_the_whole_file_plans(tmp_path, tiny_model_dir, world):
    """The whole-file plan visits randperm(10, seed) in epoch 0: the streamed file holds the prompts in that
    order and streams them unshuffled (buffer 1), so every process must get the same prompts in every batch
    of that epoch; the stream then runs on into its next pass (no batch is short, none is dropped)."""
    records = prompt_rows(10)
    whole = write_prompts(tmp_path / "whole.jsonl", records)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    ordered = write_prompts(tmp_path / "ordered.jsonl", [records[i] for i in order])
    section = {"grpo": {"prompts_per_batch": 4}}
    prep_w = prepare(config(tiny_model_dir, whole, tmp_path / "w", streaming=False, **section), log=quiet)
    prep_s = prepare(
        config(tiny_model_dir, ordered, tmp_path / "s", data={"shuffle_buffer": 1}, **section), log=quiet
    )
    assert prep_s.summary(world)["train_prompts"].startswith(f"streamed from {ordered}")

    def line(source: str) -> int:
        return int(source.split(" line ")[1])

    streamed_all: list[list[int]] = []
    for rank in range(world):
        plan_w, plan_s = prep_w.plan(world, rank), prep_s.plan(world, rank)
        prep_s.examples["train"].seek((0, 0), 0)  # each process reads the stream from its start
        for batch in range(2):  # epoch 0: 2 full batches of 4 (the whole-file plan drops 2 prompts)
            epoch_w, (idx_w,) = plan_w.step(batch)
            epoch_s, (idx_s,) = plan_s.step(batch)
            assert epoch_w == epoch_s == 0
            got = [order[line(prep_s.examples["train"][i].source) - 1] for i in idx_s]
            assert got == [line(prep_w.examples["train"][i].source) - 1 for i in idx_w], (rank, batch)
            assert len(got) == 4 // world
            streamed_all.append(got)
        epoch, (idx,) = plan_s.step(2)  # the last 2 of pass 0, then the first 2 of pass 1
        assert epoch == 0
        assert [prep_s.examples["train"][i].source for i in idx] == [
            f"{ordered} line {n}" for n in [9, 10, 1, 2][rank::world]
        ]
        assert plan_s.step(3)[0] == 1
        assert sorted(prep_s.examples["train"].window) == [12, 13, 14, 15]  # only this batch is held
    flat = sorted(i for b in streamed_all for i in b)
    assert flat == sorted(order[:8])  # no prompt skipped or taken twice, over all processes


def test_a_prompt_source_smaller_than_a_batch_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_prompts(tmp_path / "p.jsonl", prompt_rows(3))
    cfg = config(tiny_model_dir, data, tmp_path / "o", grpo={"prompts_per_batch": 4})
    plan = prepare(cfg, log=quiet).plan()
    with pytest.raises(ConfigError, match=r"grpo.prompts_per_batch \(4\) is larger than the number of training "
                       r"prompts \(3"):  # fmt: skip
        plan.step(0)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    assert main(["validate", str(path), "--no-model"]) == 2
    assert "larger than the number of training prompts (3" in capsys.readouterr().err


# --- training -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("updates", [1, 2])
def test_streamed_resume_continues_at_the_exact_prompt(
    tmp_path, tiny_model_dir, sampled, monkeypatch, updates
):
    """5 prompts, 2 a batch, a shuffle buffer of 4: the third batch spans the first pass's end. μ = 1: stop
    after step 2, resume at batch 2; μ = 2: stop after step 3, between the two updates of batch 1."""
    data = write_prompts(tmp_path / "p.jsonl", prompt_rows(5))
    sections = {"training": {"save_every": 1}, "grpo": {"updates_per_batch": updates}}
    plain = train(config(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    uninterrupted = list(sampled)
    assert [b for b, _ in uninterrupted] == list(range(4 // updates))
    first_pass = [s for _, batch in uninterrupted for s in batch][:5]  # μ = 2: its first 4 only
    lines = [f"{data} line {n}" for n in range(1, 6)]
    assert len(set(first_pass)) == len(first_pass) == (5 if updates == 1 else 4)  # none twice
    assert set(first_pass) <= set(lines)
    assert [r["epoch"] for r in rows(plain)] == ([0, 0, 0, 1] if updates == 1 else [0, 0, 0, 0])
    summary = json.loads((plain / "data_summary.json").read_text())
    assert summary["train_prompts"] == f"streamed from {data} (read, checked and tokenised as consumed)"

    sampled.clear()
    cfg = config(tiny_model_dir, data, tmp_path / "b", **sections)
    stop_at = 2 if updates == 1 else 3

    def stop(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    state = json.loads((tmp_path / f"b/checkpoints/step-000000{stop_at}/trainer_state.json").read_text())
    assert state["stream"]["updates_per_batch"] == updates
    processed = []
    call = stream_module.PromptProcessor.__call__
    counting = lambda self, row, i: processed.append(i) or call(self, row, i)  # noqa: E731
    monkeypatch.setattr(stream_module.PromptProcessor, "__call__", counting)
    train(cfg, resume=True, log=quiet)
    assert sampled == uninterrupted  # the same prompts in every batch (μ = 2: batch 1's rollout was kept)
    # μ = 1: batches 2 and 3 only; μ = 2: batch 1's prompts read again (named in messages), nothing before
    assert processed == ([4, 5, 6, 7] if updates == 1 else [2, 3])
    wa, wb = (load_file(run / "model" / "model.safetensors") for run in (plain, tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for ra, rb in zip(rows(plain), rows(tmp_path / "b"), strict=True):
        for key in ("reward", "loss", "grad_norm", "epoch"):
            assert ra[key] == rb[key], key


def test_a_bad_prompt_mid_stream_stops_training_naming_its_line(tmp_path, tiny_model_dir):
    lines: list[dict | str] = list(prompt_rows(10))
    lines[6] = {"text": "no prompt here"}  # line 7
    data = write_prompts(tmp_path / "p.jsonl", lines)
    cfg = config(tiny_model_dir, data, tmp_path / "o", data={"shuffle_buffer": 1}, training={"max_steps": 5})
    with pytest.raises(DataError, match=rf"train prompts \(streamed\): a bad record.*\n  {data} line 7: field "
                       "'prompt': missing"):  # fmt: skip
        train(cfg, log=quiet)
    assert [r["step"] for r in rows(tmp_path / "o")] == [1, 2, 3]  # the batches before line 7 trained


def test_validate_reads_a_streamed_prompt_file_once_and_lists_its_bad_lines(tmp_path, tiny_model_dir, capsys):
    lines: list[dict | str] = list(prompt_rows(30))
    for n in range(3, 30, 4):  # lines 4, 8, ..., 28: 7 bad records
        lines[n] = '{"prompt": ' if n == 3 else {"prompt": ""}
    lines.append({"prompt": "p", "prompts": "clash"})  # line 31
    data = write_prompts(tmp_path / "p.jsonl", lines)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw(tiny_model_dir, data, tmp_path / "o")), encoding="utf-8")
    assert main(["validate", str(path), "--no-model"]) == 2
    err = capsys.readouterr().err
    listed = [s.strip() for s in err.splitlines() if s.startswith(f"  {data} line ")]
    assert [int(s.split(" line ")[1].split(":")[0]) for s in listed] == [4, 8, 12, 16, 20, 24, 28, 31]
    assert "malformed JSON" in listed[0] and "field 'prompt'" in listed[1] and "clash" in listed[-1]
    assert "8 problem(s) in 30 row(s)" in err


@pytest.mark.parametrize("method", ["ppo", "online_dpo"])
def test_streamed_ppo_and_online_dpo_train_across_a_pass(tmp_path, tiny_model_dir, method):
    data = write_prompts(tmp_path / "p.jsonl", prompt_rows(3))
    run = train(config(tiny_model_dir, data, tmp_path / method, method), log=quiet)
    # 2 prompts a batch over 3: the second batch ends in the second pass; PPO: 2 minibatch steps a batch
    expected = [0, 0, 0, 0] if method == "ppo" else [0, 0, 1, 2]
    assert [r["epoch"] for r in rows(run)] == expected and (run / "model").is_dir()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_stream_the_same_batches_as_one(tmp_path, tiny_model_dir):
    """2 gloo ranks × 2 prompts == 1 process × 4 prompts on a prompt stream whose second batch spans two
    passes (draws are keyed by the prompt's stream index, not by process)."""
    data = write_prompts(tmp_path / "p.jsonl", prompt_rows(6))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])  # grpo_rewards
    for name in ("two", "one"):
        cfg = raw(
            tiny_model_dir, data, tmp_path / name, training={"max_steps": 3}, grpo={"prompts_per_batch": 4}
        )
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    two_processes_equal_one(tmp_path, env)
    for r2, r1 in zip(rows(tmp_path / "two"), rows(tmp_path / "one"), strict=True):
        assert r2["epoch"] == r1["epoch"] and r2["reward"] == pytest.approx(r1["reward"], abs=1e-6)
    assert [r["epoch"] for r in rows(tmp_path / "one")] == [0, 0, 1]
