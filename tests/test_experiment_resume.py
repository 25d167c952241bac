"""train(..., resume="auto"), what the experiment's training stages call: a finished run is returned as it is,
a run with a complete checkpoint resumes, anything else starts afresh (replacing an interrupted start)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_cfg, pair_records, quiet, write_jsonl

from preftune.training import train


def _steps(seen: list[int]):
    return lambda step, row: seen.append(step)


def test_resume_auto_fresh_finished_interrupted_and_half_started(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))
    sections = {"training": {"max_steps": 4, "save_every": 2}}

    # nothing there: a fresh run
    seen: list[int] = []
    plain = train(
        make_cfg(tiny_model_dir, data, tmp_path / "a", **sections),
        resume="auto",
        on_step_end=_steps(seen),
        log=quiet,
    )
    assert seen == [1, 2, 3, 4] and (plain / "result.json").is_file()

    # finished: returned as it is, nothing trained, nothing rewritten
    before = (plain / "model" / "model.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    seen.clear()
    again = train(
        make_cfg(tiny_model_dir, data, tmp_path / "a", **sections),
        resume="auto",
        on_step_end=_steps(seen),
        log=logs.append,
    )
    assert (
        again == plain and seen == [] and (plain / "model" / "model.safetensors").stat().st_mtime_ns == before
    )
    assert any("is complete" in line for line in logs)

    # interrupted after a checkpoint: resumed, and it ends where the uninterrupted run ends
    cfg_b = make_cfg(tiny_model_dir, data, tmp_path / "b", **sections)

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, resume="auto", on_step_end=interrupt, log=quiet)
    seen.clear()
    train(cfg_b, resume="auto", on_step_end=_steps(seen), log=quiet)
    assert seen == [3, 4]
    wa, wb = (load_file(run / "model" / "model.safetensors") for run in (plain, tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # a start that left files but no checkpoint (no --overwrite needed): replaced by a fresh run
    half = tmp_path / "c"
    half.mkdir()
    (half / "config.yaml").write_text("left over\n")
    (half / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 9.0}) + "\n")
    seen.clear()
    train(
        make_cfg(tiny_model_dir, data, half, **sections), resume="auto", on_step_end=_steps(seen), log=quiet
    )
    assert seen == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (half / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4] and rows[0]["loss"] != 9.0

    with pytest.raises(ValueError, match="resume must be True, False or 'auto'"):
        train(make_cfg(tiny_model_dir, data, tmp_path / "d"), resume="yes", log=quiet)
