"""Several processes (torch.distributed, gloo on CPU) take the same steps as one process with the same global
batch (the same weights and the same gradient norm at every step), also when the last micro-batch splits
unevenly over the ranks, with LoRA and an on-the-fly reference, and for the online methods when the prompts do
not fill the last batch of an epoch (it is dropped); the wrappers are seen through in one place. Two "nodes"
(two torchrun agents meeting at a c10d rendezvous on localhost) take the same steps as one node with two
processes, and a run directory moved elsewhere resumes where it now is."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")

LORA = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
CASES = {
    # 8 pairs: 2 ranks x 2 pairs == 1 process x 4 pairs
    "even": dict(n=8, per_rank=2, accum=1, extra={}),
    # 7 pairs, accumulation 2: the second micro-batch has 3 pairs, 2 on rank 0 and 1 on rank 1
    "uneven": dict(n=7, per_rank=2, accum=2, extra={}),
    # 5 pairs: the second micro-batch has one pair; rank 1 runs a zero-weight stand-in instead of dropping it
    "empty_share": dict(n=5, per_rank=2, accum=1, extra={}),
    # LoRA with the reference run on every batch (adapters off) through the DDP wrapper
    "lora_on_the_fly": dict(n=8, per_rank=2, accum=1, extra={"model": {"lora": LORA}}),
}


def _config(tmp_path, model_dir, data, name, batch_size, accum, extra):
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir), **extra.get("model", {})},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "training": {
            "output_dir": str(tmp_path / name),
            "batch_size": batch_size,
            "grad_accum": accum,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "progress": False,
            "precompute_ref": "model" not in extra,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pairs(tmp_path, n):
    rows = [
        {
            "prompt": f"The movie {i} was",
            "chosen": " great and wonderful.",
            "rejected": " terrible and boring.",
        }
        for i in range(n)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(tmp_path, tiny_model_dir, case):
    c = CASES[case]
    data = _pairs(tmp_path, c["n"])
    env = {**os.environ, **CPU_ENV}
    two = _config(tmp_path, tiny_model_dir, data, "two", c["per_rank"], c["accum"], c["extra"])
    one = _config(tmp_path, tiny_model_dir, data, "one", 2 * c["per_rank"], c["accum"], c["extra"])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run([*launch, "train", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(one)], env=env, check=True, capture_output=True
    )
    weights = "adapter_model.safetensors" if case == "lora_on_the_fly" else "model.safetensors"
    a = load_file(tmp_path / "two" / "model" / weights)
    b = load_file(tmp_path / "one" / "model" / weights)
    # summation order: all-reduce vs one sum, amplified by Adam
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows_two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for r2, r1 in zip(rows_two, rows_one, strict=True):
        assert r2["examples"] == r1["examples"]
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-6)
        # Adam's first step is lr·sign(g) and clipping hides scale: the norm sees a rescaled gradient
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5), r2["step"]
    summary = json.loads((tmp_path / "two" / "data_summary.json").read_text())
    assert summary["processes"] == 2 and summary["pairs_per_step"] == 2 * c["per_rank"] * c["accum"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_nodes_equal_one_node(tmp_path, tiny_model_dir):
    """The README's multi-node launch, as two "nodes" on localhost: two torchrun agents of one process each
    (``--nnodes 2 --node-rank i``) meet at a c10d rendezvous and train the same steps as one agent with
    ``--nproc_per_node 2`` (7 pairs, accumulation 2: the uneven tail too)."""
    c = CASES["uneven"]
    data = _pairs(tmp_path, c["n"])
    env = {**os.environ, **CPU_ENV}
    nodes = _config(tmp_path, tiny_model_dir, data, "nodes", c["per_rank"], c["accum"], {})
    one = _config(tmp_path, tiny_model_dir, data, "one_node", c["per_rank"], c["accum"], {})
    run = [sys.executable, "-m", "torch.distributed.run"]
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "preftune"]
    train = ["-m", "preftune.cli", "train", str(nodes)]
    agents = [
        subprocess.Popen(
            [*run, "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank), *rdzv, *train],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()  # only if still running after a timeout
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:]
    done = subprocess.run(
        [*run, "--nproc_per_node", "2", "-m", "preftune.cli", "train", str(one)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "nodes" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one_node" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the steps did something
    summary = json.loads((tmp_path / "nodes" / "data_summary.json").read_text())
    assert summary["processes"] == 2 and summary["pairs_per_step"] == 2 * c["per_rank"] * c["accum"]
    rows = [
        [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("nodes", "one_node")
    ]
    for r2, r1 in zip(*rows, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-6)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-6)


def test_a_moved_run_directory_resumes_where_it_now_is(tmp_path, tiny_model_dir):
    """Interrupted after step 2 (checkpoint at step 2), moved to another folder, resumed there from the command
    line with the new ``training.output_dir`` and no ``--allow-change``: the same weights and metrics as an
    uninterrupted 4-step run, and the run's config.yaml names its new place."""
    from preftune.cli import main
    from preftune.config import load_train_config
    from preftune.training import train

    data = _pairs(tmp_path, 8)
    steps = {"max_steps": 4, "save_every": 2}
    whole = train(load_train_config(_config(tmp_path, tiny_model_dir, data, "whole", 2, 1, {}),
                                    [f"training.{k}={v}" for k, v in steps.items()]), log=lambda *a: None)  # fmt: skip
    path = _config(tmp_path, tiny_model_dir, data, "moved", 2, 1, {})
    cfg = load_train_config(path, [f"training.{k}={v}" for k, v in steps.items()])

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=interrupt, log=lambda *a: None)
    assert (tmp_path / "moved" / "checkpoints" / "step-0000002").is_dir()
    new_place = tmp_path / "bigger_disk" / "run"
    new_place.parent.mkdir()
    shutil.move(tmp_path / "moved", new_place)
    args = ["train", str(path), "--resume", f"training.output_dir={new_place}"]
    assert main([*args, *(f"training.{k}={v}" for k, v in steps.items())]) == 0
    assert not (tmp_path / "moved").exists()  # nothing was written at the old place
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(new_place / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (new_place / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    saved = yaml.safe_load((new_place / "config.yaml").read_text())
    assert saved["training"]["output_dir"] == str(new_place)


def test_step_plan_divides_by_the_global_count():
    from preftune.training.loop import StepPlan

    ranks = [StepPlan(7, 2, 2, 0, world_size=2, rank=r) for r in (0, 1)]
    local = [sum(len(m) for m in plan.step(0)[1]) for plan in ranks]
    assert local == [4, 3] and ranks[0].step_examples(0) == ranks[1].step_examples(0) == 7
    assert StepPlan(7, 4, 2, 0).step_examples(0) == 7


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_wrappers_are_seen_through_and_the_fast_path_runs_under_ddp(tiny_tokenizer, one_rank_group):
    from conftest import build_tiny_model
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from preftune.data import pack_sequences
    from preftune.logprobs import sequence_logps
    from preftune.models import is_peft, unwrap, unwrap_model

    base = build_tiny_model(tiny_tokenizer, seed=5)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ddp = DistributedDataParallel(peft_model)
    assert is_peft(ddp) and unwrap_model(ddp) is peft_model and unwrap(ddp) is base
    shapes = []
    hook = base.get_output_embeddings().register_forward_hook(
        lambda m, a, out: shapes.append(tuple(a[0].shape))
    )
    batch = pack_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], tiny_tokenizer.pad_token_id)
    sums, _ = sequence_logps(ddp, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    sums.sum().backward()  # through DDP's own forward, so its gradient hooks run
    hook.remove()
    assert shapes == [(5, 32)]  # the head saw the 5 response positions only, not (2, T, 32)
    with torch.no_grad():
        plain, _ = sequence_logps(
            peft_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
    torch.testing.assert_close(sums.detach(), plain, rtol=0, atol=1e-6)


ONLINE = {
    "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 4, "beta": 0.05},
    # one minibatch per epoch: the global minibatch is then the same set of prompts for 1 and 2 processes
    "ppo": {"prompts_per_batch": 4, "epochs": 2, "minibatches": 1, "beta": 0.05, "adaptive_kl": True},
}
ONLINE_KEYS = {
    "grpo": ("reward", "reward_std", "kl", "completions/mean_length", "frac_reward_zero_std", "grad_norm"),
    "ppo": ("reward", "kl", "kl_coef", "value_loss", "explained_variance", "returns/mean", "grad_norm"),
}
# GRPO: 9 prompts in batches of 4 over 2 epochs, so each epoch's 9th prompt would make a short third batch
# (with 2 processes, rank 1's share empty and its collectives out of step: a hang); it waits for the next
# epoch's shuffle instead, and the run takes 2 epochs × 2 full batches = 4 steps
ONLINE_RUN = {
    "grpo": dict(prompts=9, training={"epochs": 2}, steps=4),
    "ppo": dict(prompts=8, training={"max_steps": 4}, steps=4),
}


@pytest.mark.parametrize("method", list(ONLINE))
def test_online_two_processes_equal_one(tmp_path, tiny_model_dir, method):
    """Each process samples whole groups of its prompts (draws keyed by prompt, not by process); the loss is
    aggregated over the step's tokens on every process, PPO's whitening, KL and value-head gradients over
    every process: 2 ranks × 2 prompts == 1 process × 4 prompts."""
    run = ONLINE_RUN[method]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(run["prompts"]))
    )

    def cfg(name):
        raw = {
            "method": method,
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
            "generation": {"max_new_tokens": 6, "batch_size": 16},
            "training": {"output_dir": str(tmp_path / name), **run["training"], "batch_size": 4,
                         "learning_rate": 1e-2, "progress": False, "save_every": 1, "keep_checkpoints": 4},
            method: {**ONLINE[method], "rewards": ["uneven_rewards:some_none"]},
        }  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    (tmp_path / "uneven_rewards.py").write_text(
        "def some_none(prompts, completions, completion_ids):\n"
        "    return [None if ids[0] % 3 == 0 else float(sum(ids) % 7) for ids in completion_ids]\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run(
        [*launch, "train", str(cfg("two"))], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(cfg("one"))],
        env=env,
        check=True,
        capture_output=True,
    )
    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows = [
        [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("two", "one")
    ]
    train_rows = [[r for r in runs if r["split"] == "train"] for runs in rows]
    assert [r["step"] for r in train_rows[0]] == list(range(1, run["steps"] + 1))  # what the plan says
    summary = json.loads((tmp_path / "two" / "data_summary.json").read_text())
    assert summary["optimizer_steps"] == run["steps"]
    for r2, r1 in zip(*rows, strict=True):
        for key in ONLINE_KEYS[method]:
            assert r2[key] == pytest.approx(r1[key], abs=1e-5, nan_ok=True), key
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5), r2["step"]
    # a checkpoint between the updates of a batch keeps every process's samples, each under its rank
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000001"
    if method == "ppo":  # 2 updates per batch (GRPO here: 1)
        own = [json.loads((ckpt / f"rollout-{r}.json").read_text())["prompt_index"] for r in (0, 1)]
        assert own[0] and own[1] and not set(own[0]) & set(own[1])
        a, b = (load_file(tmp_path / n / "value_head.safetensors") for n in ("two", "one"))
        torch.testing.assert_close(a["linear.weight"], b["linear.weight"], atol=1e-5, rtol=0)


def _online_config(tmp_path, model_dir, n_prompts, method, section, training):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(n_prompts)))
    return {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "learning_rate": 1e-2,
                     "progress": False, **training},
        method: {**section, "rewards": [{"name": "regex", "pattern": "e"}]},
    }  # fmt: skip


def test_ppo_takes_no_step_on_an_incomplete_batch(tmp_path, tiny_model_dir):
    """9 prompts in batches of 4, 2 minibatches: an epoch is 2 full batches (the 9th prompt waits for the
    next epoch's shuffle), so every optimizer step trains on 2 prompts (a 1-prompt third batch would give one
    empty minibatch: a step on nothing, grad_norm 0), and the run takes 2 epochs × 2 batches × 2 minibatches
    steps."""
    from preftune.training import train, validate

    section = {"prompts_per_batch": 4, "epochs": 1, "minibatches": 2, "beta": 0.05}
    cfg = _online_config(tmp_path, tiny_model_dir, 9, "ppo", section, {"epochs": 2})
    assert validate(cfg, load_weights=False, log=lambda *a: None)["optimizer_steps"] == 8
    run = train(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and [r["epoch"] for r in rows] == [0] * 4 + [1] * 4
    assert all(r["grad_norm"] > 0 for r in rows), [r["grad_norm"] for r in rows]


def test_a_batch_larger_than_the_prompts_is_refused_before_training(tmp_path, tiny_model_dir):
    from preftune.config import ConfigError
    from preftune.training import validate

    cfg = _online_config(
        tmp_path, tiny_model_dir, 3, "grpo", {"completions_per_prompt": 2, "prompts_per_batch": 4}, {}
    )
    message = r"grpo.prompts_per_batch \(4\) is larger than the number of training prompts \(3,"
    with pytest.raises(ConfigError, match=message):
        validate(cfg, load_weights=False, log=lambda *a: None)


def test_online_plans_drop_the_incomplete_batch_and_reshuffle_it():
    """drop_last: every batch full on every rank; each epoch reshuffles all 9 prompts, so the one left out
    changes from epoch to epoch and every prompt is trained on."""
    from preftune.training.loop import StepPlan

    ranks = [StepPlan(9, 2, 1, 0, world_size=2, rank=r, drop_last=True) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 2
    left_out, seen = set(), set()
    for epoch in range(6):
        batches = [[plan.step(epoch * 2 + b)[1][0] for plan in ranks] for b in range(2)]
        assert all(len(share) == 2 for batch in batches for share in batch)  # full, on every rank
        used = {i for batch in batches for share in batch for i in share}
        assert len(used) == 8  # distinct
        left_out |= set(range(9)) - used
        seen |= used
    assert len(left_out) > 1 and seen == set(range(9))
    with pytest.raises(ValueError, match="no full batch"):
        StepPlan(3, 2, 1, 0, world_size=2, drop_last=True)
