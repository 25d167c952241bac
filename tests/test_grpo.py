"""GRPO end to end on the tiny random model: the reward functions' arguments, metrics, each policy loss
(clip, gspo, cispo) trains, the policy moves while the reference stays, resume equals an uninterrupted run
(also between the μ steps of one batch of samples), a failing reward stops with a checkpoint, and config
errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import preftune
from preftune.config import ConfigError
from preftune.losses import POLICY_LOSSES
from preftune.rewards import RewardError
from preftune.training import train


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"The movie {i} was", "answer": "great" if i % 2 else "bad"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A reward module that records its calls; its rewards differ within a group (a function of the ids)."""
    (tmp_path / "grpo_rewards.py").write_text(
        textwrap.dedent(
            """
            CALLS = []

            def by_ids(prompts, completions, completion_ids, answer):
                CALLS.append({"prompts": prompts, "completions": completions, "ids": completion_ids, "answer": answer})
                return [float(sum(ids) % 7) for ids in completion_ids]

            def fails_later(prompts, completions):
                if len(CALLS) >= 2:
                    raise RuntimeError("the scorer fell over")
                CALLS.append(None)
                return [0.0] * len(completions)

            def sometimes_none(prompts, completions):
                return [None if i % 4 == 0 else float(len(c) % 5) for i, c in enumerate(completions)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("grpo_rewards", None)
    module = importlib.import_module("grpo_rewards")
    module.CALLS.clear()
    return module


def config(model_dir, prompts, out, **sections):
    raw = {
        "method": "grpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {
            "output_dir": str(out),
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "progress": False,
        },
        "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 2, "rewards": ["grpo_rewards:by_ids"]},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return preftune.load_config(raw)


def rows(run, split="train"):
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def test_grpo_end_to_end(tmp_path, tiny_model_dir, prompts, reward_module):
    cfg = config(
        tiny_model_dir, prompts, tmp_path / "run", data={"eval_fraction": 0.2}, training={"eval_every": 2}
    )
    run = train(cfg, log=quiet)
    # the reward function got the prompts, decoded completions, sampled ids and the data's column
    base_eval, first = reward_module.CALLS[0], reward_module.CALLS[1]  # evaluation at step 0 comes first
    assert len(base_eval["completions"]) == 2 * 2  # 2 held-out prompts × eval_samples_per_prompt
    assert len(first["completions"]) == len(first["ids"]) == len(first["prompts"]) == 8  # 2 prompts × 4
    assert first["prompts"][0] == first["prompts"][3] and first["prompts"][0].startswith("The movie")
    assert set(first["answer"]) <= {"great", "bad"} and all(1 <= len(ids) <= 6 for ids in first["ids"])
    train_rows = rows(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    keys = {"loss", "reward", "reward_std", "reward/grpo_rewards:by_ids", "frac_reward_zero_std", "entropy",
            "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "completions/mean_length",
            "completions/clipped_ratio", "grad_norm", "lr", "tokens_per_s", "time/generate", "time/score",
            "time/train"}  # fmt: skip
    assert keys <= set(train_rows[0])
    assert abs(train_rows[0]["loss"]) < 1e-5  # μ = 1: ρ = 1 and the advantages are centred
    assert train_rows[0]["clip_ratio/region"] == 0.0
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [0, 2, 3] and evals[0]["kl"] == 0.0
    assert evals[-1]["kl"] != 0.0 and "reward_se" in evals[-1]
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "rewards", "advantage"} <= set(samples[0])
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(run / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the policy moved


@pytest.mark.parametrize("policy_loss", list(POLICY_LOSSES))
def test_each_policy_loss_trains(tmp_path, tiny_model_dir, prompts, reward_module, policy_loss):
    """grpo.policy_loss end to end: one batch of samples serves 2 updates (the second off-policy), β > 0 so
    the KL term enters too. Finite metrics with the loss's own clip shares, its resolved clip range and
    aggregation in config.yaml, and a saved model that loads and moved."""
    import math

    import yaml
    from transformers import AutoModelForCausalLM

    spec = POLICY_LOSSES[policy_loss]
    sections = {
        "training": {"max_steps": 2},
        "grpo": {"policy_loss": policy_loss, "updates_per_batch": 2, "beta": 0.1},
    }
    run = train(config(tiny_model_dir, prompts, tmp_path / "run", **sections), log=quiet)
    train_rows = rows(run)
    assert [r["step"] for r in train_rows] == [1, 2]
    others = {k for other in POLICY_LOSSES.values() for k in other.shares} - set(spec.shares)
    for row in train_rows:
        assert {"loss", "kl", "entropy", "reward", *spec.shares} <= set(row) and not others & set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert all(train_rows[0][k] == 0.0 for k in spec.shares)  # first update: π_old = π_θ, nothing clipped
    # second update: lr 1e-2 moved the policy far from π_old (0.8 of the tokens / completions clipped)
    assert all(train_rows[1][k] > 0 for k in spec.shares if k.endswith("region"))
    if spec.per == "sequences":  # shares of the step's 2 × 4 completions
        assert all((r[k] * 8).is_integer() for r in train_rows for k in spec.shares)
    saved = yaml.safe_load((run / "config.yaml").read_text())["grpo"]  # unset: the policy loss's own
    assert (saved["epsilon_low"], saved["epsilon_high"], saved["aggregation"]) == (None, None, None)
    resolved = json.loads((run / "data_summary.json").read_text())["method_settings"]  # as trained
    assert (resolved["epsilon_low"], resolved["epsilon_high"], resolved["aggregation"]) == (
        spec.epsilon_low,
        spec.epsilon_high,
        spec.aggregation,
    )
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())
    assert any(not torch.equal(base[k], trained[k]) for k in base)


def test_reference_stays_frozen_and_kl_is_logged(tmp_path, tiny_model_dir, prompts, reward_module):
    import preftune.training.online as online

    frozen = {}
    real = online.setup_reference

    def keep(*args, **kwargs):
        ref = real(*args, **kwargs)
        frozen["ref"] = ref
        frozen["start"] = {k: v.clone() for k, v in ref.frozen.state_dict().items()}
        return ref

    online.setup_reference = keep
    try:
        run = train(config(tiny_model_dir, prompts, tmp_path / "run", grpo={"beta": 0.1}), log=quiet)
    finally:
        online.setup_reference = real
    after = frozen["ref"].frozen.state_dict()
    assert all(torch.equal(after[k], frozen["start"][k]) for k in after)
    assert all("kl" in r and r["kl"] >= 0 for r in rows(run))  # k3 is never negative
    assert rows(run)[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # π_θ = π_ref before the first update


def test_lora_reference_is_the_base_with_adapters_off(tmp_path, tiny_model_dir, prompts, reward_module):
    lora = {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    run = train(config(tiny_model_dir, prompts, tmp_path / "run", model=lora, grpo={"beta": 0.1}), log=quiet)
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    assert rows(run)[0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts, reward_module, iterations):
    sections = {"training": {"max_steps": 4, "save_every": 1}, "grpo": {"updates_per_batch": iterations}}
    plain = train(config(tiny_model_dir, prompts, tmp_path / "a", **sections), log=quiet)
    cfg = config(tiny_model_dir, prompts, tmp_path / "b", **sections)

    def stop(step, row):
        if step == 3:  # with μ = 2: between the two updates of the second batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000003"
    assert (ckpt / "rollout-0.json").is_file() == (iterations == 2)
    train(cfg, resume=True, log=quiet)
    a, b = (load_file(run / "model" / "model.safetensors") for run in (plain, tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(rows(plain), rows(tmp_path / "b"), strict=True):
        for key in ("reward", "loss", "grad_norm", "clip_ratio/region"):
            assert ra[key] == rb[key], key
    if iterations == 2:
        assert any(
            r["clip_ratio/region"] > 0 or abs(r["loss"]) > 1e-6 for r in rows(plain)[1::2]
        )  # π_old ≠ π_θ


def test_a_failing_reward_stops_naming_it_after_a_checkpoint(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    cfg = config(tiny_model_dir, prompts, tmp_path / "run", grpo={"rewards": ["grpo_rewards:fails_later"]})
    with pytest.raises(
        RewardError,
        match=r"sampling batch 2 \(prompts .*prompts.jsonl line .*grpo_rewards:fails_later.*fell over",
    ):
        train(cfg, log=quiet)
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()


def test_completions_without_reward_are_left_out(tmp_path, tiny_model_dir, prompts, reward_module):
    cfg = config(
        tiny_model_dir,
        prompts,
        tmp_path / "run",
        grpo={"rewards": ["grpo_rewards:sometimes_none"], "log_completions_every": 1},
    )
    run = train(cfg, log=quiet)
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    missing = [s for s in samples if s["reward"] is None]
    assert missing and all(s["advantage"] == 0.0 for s in missing)


def test_config_errors(tmp_path, tiny_model_dir, prompts):
    with pytest.raises(ConfigError, match="completions_per_prompt must be >= 2"):
        config(tiny_model_dir, prompts, tmp_path / "r", grpo={"completions_per_prompt": 1})
    with pytest.raises(ConfigError, match="grad_accum is not used by online methods"):
        config(tiny_model_dir, prompts, tmp_path / "r", training={"grad_accum": 2})
    with pytest.raises(ConfigError, match="max_prompt_length .* \\+ generation.max_new_tokens"):
        config(tiny_model_dir, prompts, tmp_path / "r", generation={"max_new_tokens": 40})
    with pytest.raises(ConfigError, match="section generation is for online methods"):
        preftune.load_config(
            {"method": "dpo", "data": {"train": "x.jsonl"}, "generation": {"max_new_tokens": 4}}
        )
    with pytest.raises(ValueError, match="cannot import module"):
        preftune.validate(
            config(tiny_model_dir, prompts, tmp_path / "r", grpo={"rewards": ["nope_mod:f"]}),
            load_weights=False,
        )
    with pytest.raises(ValueError, match="length reward: target"):
        preftune.validate(
            config(
                tiny_model_dir, prompts, tmp_path / "r", grpo={"rewards": [{"name": "length", "target": 0}]}
            ),
            load_weights=False,
        )


def test_shared_prefix_training_equals_the_plain_path(tmp_path, tiny_model_dir, prompts, reward_module):
    runs = {
        share: train(config(tiny_model_dir, prompts, tmp_path / f"s{share}", training={"share_prefix": share},
                            grpo={"beta": 0.1, "updates_per_batch": 2}), log=quiet)
        for share in (True, False)
    }  # fmt: skip
    a, b = (load_file(runs[s] / "model" / "model.safetensors") for s in (True, False))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # Adam at lr 1e-2 moves ~1e-2 a step
    for ra, rb in zip(rows(runs[True]), rows(runs[False]), strict=True):
        for key in ("reward", "kl", "entropy", "clip_ratio/region"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
