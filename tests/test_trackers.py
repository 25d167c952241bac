"""Trackers (``training.report_to``): the resolved config reaches them flattened to the scalar
hyperparameters they accept, and a run with each installed tracker writes its files (tensorboard, wandb in
offline mode, trackio); a tracker that is not installed is skipped with the reason."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_grpo import config as grpo_config
from test_grpo import prompts, reward_module  # noqa: F401  (fixtures)
from test_training import make_cfg, pair_records, quiet, write_jsonl

from preftune.training import train
from preftune.training.engine import tracker_config


def test_tracker_config_is_flat_and_scalar():
    nested = {"method": "dpo", "model": {"lora": {"r": 8, "target_modules": ["q", "v"]}, "name_or_path": None},
              "training": {"report_to": ["tensorboard"], "learning_rate": 5e-6, "bf16": False}}  # fmt: skip
    flat = tracker_config(nested)
    assert flat == {
        "method": "dpo",
        "model.lora.r": 8,
        "model.lora.target_modules": '["q", "v"]',
        "model.name_or_path": "null",
        "training.report_to": '["tensorboard"]',
        "training.learning_rate": 5e-6,
        "training.bf16": False,
    }
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def _installed(name: str):
    return pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} is not installed")


TRACKERS = [
    pytest.param("tensorboard", "events.out.tfevents*", marks=_installed("tensorboard")),
    pytest.param("wandb", "*.wandb", marks=_installed("wandb")),
    pytest.param("trackio", "*", marks=_installed("trackio")),
]


@pytest.mark.parametrize(("tracker", "pattern"), TRACKERS)
def test_an_offline_run_logs_to_the_tracker(tmp_path, tiny_model_dir, monkeypatch, tracker, pattern):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 2, "report_to": [tracker]})
    run = train(cfg, log=quiet)
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2
    assert list(tmp_path.rglob(pattern)), f"no {tracker} files under {tmp_path}"


@pytest.mark.parametrize(("tracker", "pattern"), TRACKERS)
def test_an_online_run_logs_to_the_tracker(
    tmp_path,
    tiny_model_dir,
    prompts,  # noqa: F811
    reward_module,  # noqa: F811
    monkeypatch,
    tracker,
    pattern,
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    cfg = grpo_config(
        tiny_model_dir, prompts, tmp_path / "run", training={"max_steps": 2, "report_to": [tracker]}
    )
    run = train(cfg, log=quiet)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert list(tmp_path.rglob(pattern)), f"no {tracker} files under {tmp_path}"
