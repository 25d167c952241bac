"""Two processes (torch.distributed, gloo on CPU) take the same steps as one process with the same global
batch: 2 ranks x 2 pairs == 1 rank x 4 pairs, in weights and in the logged (all-rank) metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")


def _config(tmp_path, model_dir, data, name, batch_size):
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "training": {
            "output_dir": str(tmp_path / name),
            "batch_size": batch_size,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "progress": False,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    rows = [
        {
            "prompt": f"The movie {i} was",
            "chosen": " great and wonderful.",
            "rejected": " terrible and boring.",
        }
        for i in range(8)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = _config(tmp_path, tiny_model_dir, data, "two", batch_size=2)
    one = _config(tmp_path, tiny_model_dir, data, "one", batch_size=4)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    subprocess.run([*launch, "train", str(two)], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(one)], env=env, check=True, capture_output=True
    )
    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert (
        max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    )  # summation order: all-reduce vs one sum, amplified by Adam
    rows_two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for r2, r1 in zip(rows_two, rows_one, strict=True):
        assert r2["examples"] == r1["examples"] == 4
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-6)
