"""PPO end to end on the tiny random model: metrics, the policy and the value head move while the reference
stays, the critic reads the hidden states the LM head reads, resume equals an uninterrupted run (also between
the minibatches of one batch of rollouts, with the adaptive KL coefficient), LoRA, and config errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import preftune
from preftune.config import ConfigError
from preftune.logprobs import shared_prefix_logps
from preftune.training import train


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(12)))
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "ppo_rewards.py").write_text(
        textwrap.dedent(
            """
            def by_ids(prompts, completions, completion_ids):
                return [float(sum(ids) % 7) / 7 for ids in completion_ids]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("ppo_rewards", None)


def config(model_dir, prompts, out, **sections):
    raw = {
        "method": "ppo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "progress": False,
        },
        "ppo": {"prompts_per_batch": 4, "epochs": 1, "minibatches": 2, "rewards": ["ppo_rewards:by_ids"]},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return preftune.load_config(raw)


def rows(run, split="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_same_weights(run_a, run_b):
    """The policy and the value head of two runs are bit-identical."""
    for name in ("model/model.safetensors", "value_head.safetensors"):
        a, b = (load_file(run / name) for run in (run_a, run_b))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ppo_end_to_end(tmp_path, tiny_model_dir, prompts, reward_module):
    cfg = config(
        tiny_model_dir,
        prompts,
        tmp_path / "run",
        data={"eval_fraction": 0.25},
        training={"eval_every": 2},
        ppo={"adaptive_kl": True, "target_kl": 0.01, "kl_horizon_batches": 25, "log_completions_every": 4},
    )
    run = train(cfg, log=quiet)
    train_rows = rows(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in (
        "reward", "reward_shaped", "kl", "kl_coef", "policy_loss", "value_loss", "explained_variance",
        "clip_ratio/policy", "clip_ratio/value", "approx_kl", "entropy", "completions/mean_length",
        "tokens_per_s", "time/generate", "time/train", "values/mean", "returns/mean",
    ):  # fmt: skip
        assert key in train_rows[0], key
    # the first batch is sampled from π_ref: its KL is 0 and the coefficient starts at ppo.beta
    assert train_rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and train_rows[0]["kl_coef"] == 0.05
    # 4 updates = 2 batches of rollouts × (1 epoch × 2 minibatches): the batch's statistics repeat
    assert train_rows[0]["reward"] == train_rows[1]["reward"] != train_rows[2]["reward"]
    assert train_rows[2]["kl"] > 0  # the second batch comes from the updated policy
    # the first batch's KL (0) ran below target: e = clip(0/0.01 − 1) = −0.2, one step of a 25-batch horizon
    assert train_rows[2]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 / 25), rel=1e-12)
    assert train_rows[0]["values/mean"] == 0.0  # the value head starts at 0
    assert train_rows[2]["values/mean"] != 0.0  # and learns
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[0]["kl"] == 0.0 and evals[-1]["kl"] != 0.0
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])
    # every 4 steps at 2 steps a batch: the first batch (step 1) and the batch of steps 3-4, logged at its first
    assert sorted({s["step"] for s in samples}) == [1, 3]
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(run / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the policy moved
    head = load_file(run / "value_head.safetensors")
    assert float(head["linear.weight"].abs().max()) > 0  # the critic moved
    assert set(trained) == set(base)  # model/ holds the policy alone, in the standard format


def test_the_kl_coefficient_adapts_upwards(tmp_path, tiny_model_dir, prompts, reward_module):
    cfg = config(
        tiny_model_dir,
        prompts,
        tmp_path / "run",
        ppo={"adaptive_kl": True, "target_kl": 1e-6, "kl_horizon_batches": 2.5},
        training={"max_steps": 6},
    )
    coefs = [r["kl_coef"] for r in rows(train(cfg, log=quiet))[::2]]
    # batch 1 comes from π_ref (KL 0, below target): × (1 − 0.2/2.5); batch 2's KL is above 1e-6: × 1.08
    assert coefs == pytest.approx([0.05, 0.05 * 0.92, 0.05 * 0.92 * 1.08], rel=1e-12)


def test_reference_stays_frozen(tmp_path, tiny_model_dir, prompts, reward_module):
    import preftune.training.online as online

    frozen = {}
    real = online.setup_reference

    def keep(*args, **kwargs):
        ref = real(*args, **kwargs)
        frozen["ref"], frozen["start"] = ref, {k: v.clone() for k, v in ref.frozen.state_dict().items()}
        return ref

    online.setup_reference = keep
    try:
        train(config(tiny_model_dir, prompts, tmp_path / "run"), log=quiet)
    finally:
        online.setup_reference = real
    after = frozen["ref"].frozen.state_dict()
    assert all(torch.equal(after[k], frozen["start"][k]) for k in after)


def test_the_value_head_reads_the_hidden_states_of_the_lm_head(tiny_model_dir):
    from preftune.models import load_model

    model = load_model(str(tiny_model_dir)).eval()
    prompts = [[5, 6, 7], [8, 9]]
    groups = [[[10, 11, 12], [13]], [[14, 15]]]
    outs = {}
    for share in (True, False):
        hidden: list = []
        with torch.no_grad():
            logps, _, _ = shared_prefix_logps(model, prompts, groups, 0, share=share, hidden_out=hidden)
        outs[share] = (logps, hidden[0])
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-5, rtol=1e-5)
    # by hand: the trunk's last hidden state (after its final norm) at each position that predicts a token
    expected = []
    for p, group in zip(prompts, groups):
        for c in group:
            with torch.no_grad():
                h = model.model(input_ids=torch.tensor([p + c])).last_hidden_state[0]
            expected.append(h[len(p) - 1 : len(p) + len(c) - 1])
    torch.testing.assert_close(outs[False][1], torch.cat(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sections", [{}, {"ppo": {"epochs": 2, "minibatches": 2, "adaptive_kl": True}}])
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts, reward_module, sections):
    sections = {**sections, "training": {"max_steps": 6, "save_every": 1}}
    plain = train(config(tiny_model_dir, prompts, tmp_path / "a", **sections), log=quiet)
    cfg = config(tiny_model_dir, prompts, tmp_path / "b", **sections)

    def stop(step, row):
        if step == 3:  # between the minibatches of the second batch (2 or 4 updates per batch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000003"
    assert (ckpt / "rollout-0.json").is_file() and (ckpt / "value_head.safetensors").is_file()
    train(cfg, resume=True, log=quiet)
    assert_same_weights(plain, tmp_path / "b")
    for ra, rb in zip(rows(plain), rows(tmp_path / "b"), strict=True):
        for key in ("reward", "loss", "grad_norm", "kl_coef", "value_loss", "clip_ratio/policy"):
            assert ra[key] == rb[key], key


def test_lora_trains_adapters_and_the_value_head(tmp_path, tiny_model_dir, prompts, reward_module):
    lora = {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    run = train(config(tiny_model_dir, prompts, tmp_path / "run", model=lora), log=quiet)
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    assert float(load_file(run / "value_head.safetensors")["linear.weight"].abs().max()) > 0
    assert rows(run)[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # π_ref = the base with adapters off


def test_entropy_bonus_changes_the_update(tmp_path, tiny_model_dir, prompts, reward_module):
    runs = [
        train(config(tiny_model_dir, prompts, tmp_path / f"e{c}", ppo={"entropy_coef": c}, training={"max_steps": 1}),
              log=quiet)
        for c in (0.0, 1.0)
    ]  # fmt: skip
    a, b = (load_file(r / "model" / "model.safetensors") for r in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(runs[0])[0], rows(runs[1])[0]
    assert rb["loss"] == pytest.approx(ra["loss"] - rb["entropy"], rel=1e-5)


def test_config_errors(tmp_path, tiny_model_dir, prompts):
    with pytest.raises(ConfigError, match="multiple of ppo.minibatches"):
        config(tiny_model_dir, prompts, tmp_path / "r", ppo={"prompts_per_batch": 5})
    with pytest.raises(ConfigError, match="vf_coef must be > 0"):
        config(tiny_model_dir, prompts, tmp_path / "r", ppo={"vf_coef": 0})
    with pytest.raises(ConfigError, match="ppo.kl must be one of k1, k3"):
        config(tiny_model_dir, prompts, tmp_path / "r", ppo={"kl": "k2"})
    with pytest.raises(ConfigError, match="adaptive_kl needs a starting ppo.beta > 0"):
        config(tiny_model_dir, prompts, tmp_path / "r", ppo={"adaptive_kl": True, "beta": 0})
    with pytest.raises(ConfigError, match="section\\(s\\) grpo given but method is 'ppo'"):
        config(tiny_model_dir, prompts, tmp_path / "r", grpo={"completions_per_prompt": 4})


def test_sigterm_mid_batch_checkpoints_and_resume_equals_uninterrupted(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    import os
    import signal

    from preftune.training.signals import Terminated

    sections = {"training": {"max_steps": 4}}
    plain = train(config(tiny_model_dir, prompts, tmp_path / "a", **sections), log=quiet)
    cfg = config(tiny_model_dir, prompts, tmp_path / "b", **sections)

    def term(step, row):
        if step == 1:  # between the two minibatches of the first batch of rollouts
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(cfg, on_step_end=term, log=quiet)
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000001"
    assert (ckpt / "rollout-0.json").is_file() and (ckpt / "value_head.safetensors").is_file()
    train(cfg, resume=True, log=quiet)
    assert_same_weights(plain, tmp_path / "b")


def test_a_stop_on_a_batch_first_step_keeps_the_kl_coefficient_that_batch_started_from(
    tmp_path, tiny_model_dir, prompts, reward_module, monkeypatch
):
    """A run stopped on a batch's first step checkpoints the batch boundary: it must keep the coefficient that
    batch was prepared with (the resumed run prepares the batch again)."""
    from preftune.training.engine import NonFiniteError
    from preftune.training.ppo import PPO

    sections = {
        "ppo": {"adaptive_kl": True, "target_kl": 1e-6, "kl_horizon_batches": 2.5},
        "training": {"max_steps": 4},
    }
    plain = rows(train(config(tiny_model_dir, prompts, tmp_path / "a", **sections), log=quiet))
    real, calls = PPO.train_step, []

    def failing(self, model, rollout, iteration):
        sums, finite = real(self, model, rollout, iteration)
        calls.append(1)
        return sums, finite and len(calls) != 3  # step 3: the first update of the second batch

    monkeypatch.setattr(PPO, "train_step", failing)
    with pytest.raises(NonFiniteError, match="step 3"):
        train(config(tiny_model_dir, prompts, tmp_path / "b", **sections), log=quiet)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["kl_coef"] == plain[2]["kl_coef"]  # what batch 2 was prepared with, not its update
    assert plain[2]["kl_coef"] != plain[0]["kl_coef"]
