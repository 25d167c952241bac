"""DAPO's dynamic sampling (``grpo.dynamic_sampling``): groups without reward spread are replaced by more
sampled groups until the batch is full, at most ``dynamic_sampling_max_rounds`` extra rounds, then filled
with the dropped groups; counts logged; resume and two processes stay exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_grpo import config, quiet, rows

from preftune.training import train
from preftune.training.dynamic import concat, extra_prompts, take_groups
from preftune.training.rollout import Rollout


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows_ = [{"prompt": f"The movie {i} was", "answer": "great" if i % 3 else "bad"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """``flat_when_bad``: a constant reward for the prompts whose answer is 'bad' (no spread: no gradient),
    a function of the ids otherwise; ``flat``: a constant reward for every completion."""
    (tmp_path / "dyn_rewards.py").write_text(
        textwrap.dedent(
            """
            SEEN = []

            def flat_when_bad(prompts, completions, completion_ids, answer):
                SEEN.append(list(answer))
                return [1.0 if a == "bad" else float(sum(ids) % 7) for a, ids in zip(answer, completion_ids)]

            def flat(prompts, completions):
                return [1.0] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    sys.modules.pop("dyn_rewards", None)
    return importlib.import_module("dyn_rewards")


def _rollout(n_groups: int, G: int) -> Rollout:
    n = n_groups * G
    return Rollout(
        batch=3,
        prompt_index=list(range(10, 10 + n_groups)),
        prompt_ids=[[g] for g in range(n_groups) for _ in range(G)],
        completion_ids=[[i, i] for i in range(n)],
        completions=[f"c{i}" for i in range(n)],
        rewards=torch.arange(n, dtype=torch.float64),
        per_function={"f": list(range(n))},
        truncated=torch.zeros(n, dtype=torch.bool),
        sample_logps=torch.arange(n * 2, dtype=torch.float32).view(n, 2),
        stats={"reward": 1.0},
    )


def test_groups_are_taken_and_joined_whole():
    r = _rollout(3, 2)
    picked = take_groups(r, [2, 0], 2)
    assert picked.prompt_index == [12, 10]
    assert picked.completions == ["c4", "c5", "c0", "c1"]
    assert picked.rewards.tolist() == [4.0, 5.0, 0.0, 1.0]
    assert picked.per_function == {"f": [4, 5, 0, 1]}
    assert picked.sample_logps[:, 0].tolist() == [8.0, 10.0, 0.0, 2.0]
    joined = concat([picked, take_groups(r, [1], 2)])
    assert joined.prompt_index == [12, 10, 11] and joined.completions[-2:] == ["c2", "c3"]
    assert joined.rewards.tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0] and joined.batch == 3


def test_extra_prompts_are_seeded_and_split_over_processes_like_the_batch():
    one = extra_prompts(12, 4, seed=0, batch=2, round_=1, world=1, rank=0)
    halves = [extra_prompts(12, 4, seed=0, batch=2, round_=1, world=2, rank=r) for r in (0, 1)]
    assert len(one) == 4 and sorted(halves[0] + halves[1]) == sorted(one)
    assert one == extra_prompts(12, 4, seed=0, batch=2, round_=1, world=1, rank=0)
    assert one != extra_prompts(12, 4, seed=0, batch=2, round_=2, world=1, rank=0)
    assert len(extra_prompts(3, 4, seed=0, batch=0, round_=1, world=1, rank=0)) == 4  # wraps around


def test_groups_without_spread_are_replaced(tmp_path, tiny_model_dir, prompts, reward_module):
    """A third of the prompts give a flat reward: with dynamic sampling every trained group has spread, and
    the counts say how many groups were sampled to get there."""
    G, P = 4, 4
    section = {"completions_per_prompt": G, "prompts_per_batch": P, "rewards": ["dyn_rewards:flat_when_bad"]}
    plain = train(config(tiny_model_dir, prompts, tmp_path / "plain", grpo=section), log=quiet)
    assert any(r["frac_reward_zero_std"] > 0 for r in rows(plain))  # the data has flat groups
    dyn = {**section, "dynamic_sampling": True, "dynamic_sampling_max_rounds": 6}
    run = train(config(tiny_model_dir, prompts, tmp_path / "dyn", grpo=dyn), log=quiet)
    for r in rows(run):
        assert r["frac_reward_zero_std"] == 0.0
        assert r["dynamic/kept_groups"] == P and r["dynamic/filled_groups"] == 0
        assert r["dynamic/sampled_groups"] == P * (1 + r["dynamic/rounds"])
    assert any(r["dynamic/rounds"] > 0 for r in rows(run))
    # the reward saw the extra rounds' prompts: more calls than batches
    assert len(reward_module.SEEN) > len(rows(run))


def test_at_the_cap_the_batch_is_filled_with_the_dropped_groups(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    section = {"completions_per_prompt": 4, "prompts_per_batch": 2, "rewards": ["dyn_rewards:flat"]}
    dyn = {**section, "dynamic_sampling": True, "dynamic_sampling_max_rounds": 2}
    run = train(config(tiny_model_dir, prompts, tmp_path / "dyn", grpo=dyn), log=quiet)
    for r in rows(run):
        assert r["dynamic/rounds"] == 2 and r["dynamic/sampled_groups"] == 6
        assert r["dynamic/kept_groups"] == 0 and r["dynamic/filled_groups"] == 2
        assert r["frac_reward_zero_std"] == 1.0 and r["grad_norm"] == 0.0  # nothing to learn, nothing learnt


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts, reward_module, iterations):
    dyn = {"completions_per_prompt": 4, "prompts_per_batch": 4, "updates_per_batch": iterations, "dynamic_sampling": True,
           "rewards": ["dyn_rewards:flat_when_bad"]}  # fmt: skip
    sections = {"grpo": dyn, "training": {"max_steps": 4, "save_every": 1}}
    whole = train(config(tiny_model_dir, prompts, tmp_path / "whole", **sections), log=quiet)
    cfg = config(tiny_model_dir, prompts, tmp_path / "cut", **sections)

    def stop(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    train(cfg, resume=True, log=quiet)
    a, b = (
        load_file(whole / "model" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("reward", "reward_std", "dynamic/rounds", "dynamic/sampled_groups", "grad_norm")
    assert [[r[k] for k in keys] for r in rows(whole)] == [
        [r[k] for k in keys] for r in rows(tmp_path / "cut")
    ]


def test_two_processes_take_the_same_rounds(tmp_path, tiny_model_dir):
    """Each process refills its own share; every process samples in every round (no collective out of step)
    and the batch keeps its shape: the run finishes and logs the same counts on both launches' terms."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(8)))
    raw = {
        "method": "grpo",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(path), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 4, "batch_size": 16},
        "training": {"output_dir": str(tmp_path / "two"), "max_steps": 2, "batch_size": 4,
                     "learning_rate": 1e-2, "progress": False},
        "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 4, "dynamic_sampling": True,
                 "dynamic_sampling_max_rounds": 2, "rewards": [{"name": "regex", "pattern": "e"}]},
    }  # fmt: skip
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run([*launch, "train", str(cfg)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in rows(tmp_path / "two"):
        assert r["dynamic/kept_groups"] + r["dynamic/filled_groups"] == 4
        assert r["dynamic/sampled_groups"] == 4 * (1 + r["dynamic/rounds"])
        assert r["frac_reward_zero_std"] == pytest.approx(r["dynamic/filled_groups"] / 4)
