"""kill -9 of every process of a sharded, streamed online run, then ``--resume``: the same weights, bit for
bit, and the same logged rows as the run that was not interrupted.

Marked ``slow`` (about 3 minutes on 2 CPU cores: three 2-process launches), so the default suite skips it;
run it with ``python -m pytest -m slow tests/test_kill_resume.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from test_grpo import reward_module, rows  # noqa: F401 (reward_module: a fixture)
from test_online_streaming import prompt_rows, raw, write_prompts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("reward_module"),
    pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux"),
]
TWO = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli", "train"]


def test_kill_9_of_a_sharded_streamed_grpo_run_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """GRPO, ``training.sharding: fsdp`` on 2 gloo processes, prompts streamed, 2 updates per batch of
    samples: killed (SIGKILL to the agent and both workers) after the step-3 checkpoint, between the two
    updates of batch 1; ``--resume`` re-reads that batch's prompts, reuses its saved samples and ends equal to
    the uninterrupted run. The uninterrupted run also equals one process (fp32 reduction order)."""
    data = write_prompts(tmp_path / "p.jsonl", prompt_rows(6))
    (tmp_path / "slow_rewards.py").write_text(  # a second per batch: the kill lands before the run ends
        "import time\nfrom grpo_rewards import by_ids\n\n"
        "def slow(prompts, completions, completion_ids, answer):\n"
        "    time.sleep(1.0)\n    return by_ids(prompts, completions, completion_ids, answer)\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    for name in ("whole", "killed", "one"):
        sharding = {} if name == "one" else {"sharding": "fsdp"}
        cfg = raw(
            tiny_model_dir, data, tmp_path / name, training={"max_steps": 6, "save_every": 1, **sharding},
            grpo={"prompts_per_batch": 4, "updates_per_batch": 2, "rewards": ["slow_rewards:slow"]},
        )  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg), encoding="utf-8")

    def run(*args: str) -> None:
        done = subprocess.run([*args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run(*TWO, str(tmp_path / "whole.yaml"))
    run(sys.executable, "-m", "preftune.cli", "train", str(tmp_path / "one.yaml"))
    agent = subprocess.Popen(
        [*TWO, str(tmp_path / "killed.yaml")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    while not (checkpoints / "step-0000003").is_dir():
        assert agent.poll() is None, "the run ended before the kill"
        time.sleep(0.02)
    subprocess.run(["pkill", "-9", "-f", str(tmp_path / "killed.yaml")], check=True)  # agent and workers
    agent.wait(timeout=60)
    assert not (tmp_path / "killed" / "model").exists()
    assert not (checkpoints / "step-0000005").exists()  # batch 2's reward sleeps a second: killed before
    run(*TWO, str(tmp_path / "killed.yaml"), "--resume")

    whole, killed, one = (
        load_file(tmp_path / n / "model" / "model.safetensors") for n in ("whole", "killed", "one")
    )
    assert all(bool((whole[k] == killed[k]).all()) for k in whole)  # bit-equal
    assert max(float((whole[k] - one[k]).abs().max()) for k in whole) < 1e-5
    for a, b in zip(rows(tmp_path / "whole"), rows(tmp_path / "killed"), strict=True):
        assert (a["step"], a["reward"], a["loss"], a["grad_norm"]) == (
            b["step"],
            b["reward"],
            b["loss"],
            b["grad_norm"],
        )
    assert [r["step"] for r in rows(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]
