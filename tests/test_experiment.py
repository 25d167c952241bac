"""End-to-end sentiment experiment on the tiny random model: outputs, caching, and invalidation."""

from __future__ import annotations

import json

import pytest
import torch

from preftune import heldout
from preftune.config import ConfigError
from preftune.experiments.config import experiment_config_from_dict, load_experiment_config
from preftune.experiments.pairs import label_by_median
from preftune.experiments.pipeline import run_experiment
from preftune.files import read_jsonl


def _cfg(tmp_path, model_dir, **extra):
    raw = {
        "output_dir": str(tmp_path / "exp"),
        "model": str(model_dir),
        "progress": False,
        "prompts": {"n_train": 6, "n_heldout": 3},
        "sample": {"k": 3, "max_new_tokens": 6, "batch_size": 8},
        "pairs": {"mode": "all"},
        "train": {
            "batch_size": 4,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "max_length": 48,
            "max_prompt_length": 24,
        },
        "methods": [
            {"method": "dpo", "betas": [0.1, 0.5]},
            {"method": "simpo", "betas": [2.0], "gamma": 0.5},
        ],
        "eval": {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 8},
    }
    raw.update(extra)
    return experiment_config_from_dict(raw)


def _check_kl_against_slow_forwards(root, base_dir, name):
    """kl.json (each sample's log π_θ − log π_ref; π_θ's term the sampler's own in fp32) against one plain
    forward per sample of the trained model and of the base model; samples.jsonl keeps the sampler's log π_θ."""
    from transformers import AutoModelForCausalLM

    def logp(model, prompt, completion):
        with torch.no_grad():
            z = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
        return float(torch.log_softmax(z, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).sum())

    policy = AutoModelForCausalLM.from_pretrained(root / "train" / name / "run" / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    records = read_jsonl(root / "eval" / name / "samples.jsonl")
    pairs = [(r["prompt_ids"], c, lp) for r in records for c, lp in zip(r["response_ids"], r["logps"])]
    mine = [logp(policy, p, c) for p, c, _ in pairs]
    assert [lp for _, _, lp in pairs] == pytest.approx(mine, abs=1e-4)
    expected = [m - logp(base, p, c) for m, (p, c, _) in zip(mine, pairs)]
    assert json.loads((root / "eval" / name / "kl.json").read_text()) == pytest.approx(expected, abs=1e-4)
    assert max(abs(e) for e in expected) > 1e-3  # the model moved: the check is not of zeros


def test_experiment_end_to_end_and_caching(tmp_path, tiny_model_dir):
    logs: list[str] = []
    rows = run_experiment(_cfg(tmp_path, tiny_model_dir), log=logs.append)
    root = tmp_path / "exp"
    assert [(r["method"], r["beta"]) for r in rows] == [
        ("base", None),
        ("dpo", 0.1),
        ("dpo", 0.5),
        ("simpo", 2.0),
    ]
    base = rows[0]
    assert base["kl_mean"] == 0.0 and base["win_rate"] == 0.5
    assert all(r["n_samples"] == 6 for r in rows)  # 3 held-out prompts x 2 samples
    assert (root / "results.csv").read_text().splitlines()[0].startswith("method,beta,reward_mean")
    assert json.loads((root / "results.json").read_text())[1]["method"] == "dpo"
    for png in ("frontier.png", "training_curves.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dpo |" in (root / "report.md").read_text() or "dpo" in (root / "report.md").read_text()
    pairs = [json.loads(line) for line in (root / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    # pairs carry the sampled token ids, so training sees exactly what was sampled (no invented EOS)
    samples = [json.loads(line) for line in (root / "samples" / "samples.jsonl").read_text().splitlines()]
    sampled = {tuple(ids) for rec in samples for ids in rec["response_ids"]}
    assert all(tuple(p["chosen_ids"]) in sampled and tuple(p["rejected_ids"]) in sampled for p in pairs)
    # SimPO loads no reference; DPO runs reuse the shared reference log-probs
    assert not (root / "train" / "simpo-gamma0.5-beta2" / "run" / "ref_logps.safetensors").exists()
    assert (root / "train" / "dpo-beta0.1" / "run" / "ref_logps.safetensors").exists()
    _check_kl_against_slow_forwards(root, tiny_model_dir, "dpo-beta0.1")

    # a rerun skips every stage and gives the same rows
    logs.clear()
    again = run_experiment(_cfg(tmp_path, tiny_model_dir), log=logs.append)
    assert not [line for line in logs if line.startswith("[run]")]
    assert again == rows

    # a changed training input reruns that training stage and its evaluation only
    logs.clear()
    changed = _cfg(tmp_path, tiny_model_dir, methods=[{"method": "dpo", "betas": [0.1]}])
    changed.train["learning_rate"] = 2e-3
    run_experiment(changed, log=logs.append)
    ran = [line for line in logs if line.startswith("[run]")]
    assert ran == ["[run] dpo-beta0.1", "[run] dpo-beta0.1"]  # train stage, then its eval stage


def test_experiment_config_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        experiment_config_from_dict({"sample": {"kk": 3}})
    with pytest.raises(ConfigError, match="dpo"):
        experiment_config_from_dict({"methods": [{"method": "dpo", "betas": [0.1], "gamma": 1.0}]})
    with pytest.raises(ConfigError, match="betas"):
        experiment_config_from_dict({"methods": [{"method": "dpo", "beta": 0.5}]})
    with pytest.raises(ConfigError, match="temperature"):
        experiment_config_from_dict({"eval": {"temperature": 0.7}})
    with pytest.raises(ConfigError, match="k must be >= 2"):
        experiment_config_from_dict({"sample": {"k": 1}})


def test_train_section_is_a_partial_train_config():
    """`train` holds keys of `preftune train`'s sections, checked there; a key not given is TrainConfig's."""
    from preftune.config import DataConfig, TrainingConfig
    from preftune.experiments.config import plan_runs, train_config, train_sections

    assert train_sections({"batch_size": 8, "max_length": 64, "lora": {"enabled": True}}) == {
        "training": {"batch_size": 8},
        "data": {"max_length": 64},
        "model": {"lora": {"enabled": True}},
    }
    train = {"epochs": 2, "max_length": 300}
    cfg = experiment_config_from_dict({"methods": [{"method": "dpo", "betas": [0.1]}], "train": train})
    (run,) = plan_runs(cfg)
    tcfg = train_config(cfg, run.run, run.beta, output_dir="x")
    assert tcfg.training.epochs == 2 and tcfg.training.batch_size == TrainingConfig().batch_size
    assert tcfg.training.learning_rate == TrainingConfig().learning_rate
    assert tcfg.data.max_length == 300 and tcfg.data.max_prompt_length == DataConfig().max_prompt_length
    assert tcfg.model.dtype == "float32" and not tcfg.model.lora.enabled
    lora = experiment_config_from_dict({"dtype": "bfloat16", "train": {"lora": {"enabled": True, "r": 4}}})
    (run,) = plan_runs(lora)
    tcfg = train_config(lora, run.run, run.beta, output_dir="x")
    assert tcfg.model.lora.enabled and tcfg.model.lora.r == 4 and tcfg.model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) 'learning_rat'"):
        experiment_config_from_dict({"train": {"learning_rat": 1e-5}})
    with pytest.raises(ConfigError, match="seed set by the experiment"):
        experiment_config_from_dict({"train": {"seed": 1}})
    with pytest.raises(ConfigError, match="train.batch_size"):
        experiment_config_from_dict({"train": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match="unknown key.*.rr.* in section .experiment config: train.lora"):
        experiment_config_from_dict({"train": {"lora": {"rr": 4}}})


def test_presets_load(tmp_path, monkeypatch):
    quick = load_experiment_config("quick")
    full = load_experiment_config("full", ["seed=3"])
    assert {m.method for m in quick.methods} >= {"dpo", "odpo", "simpo", "ipo"}
    assert full.seed == 3 and all(len(m.betas) >= 3 for m in full.methods)
    # `preftune experiment paper output_dir=paper` run again from the same folder: the output folder named
    # like the preset is not taken for its config file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()
    assert load_experiment_config("quick") == quick


def test_interrupted_training_stage_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C inside a training stage keeps its checkpoint; the rerun resumes it and ends where an
    uninterrupted experiment ends."""
    from safetensors.torch import load_file

    import preftune.training as training

    methods = [{"method": "dpo", "betas": [0.1]}]
    plain = _cfg(tmp_path / "a", tiny_model_dir, methods=methods)
    run_experiment(plain, log=lambda *_: None)

    real_train = training.train

    def interrupted(cfg, **kwargs):
        def stop(step, row):
            if step == 1:
                raise KeyboardInterrupt

        return real_train(cfg, on_step_end=stop, **kwargs)

    cfg = _cfg(tmp_path / "b", tiny_model_dir, methods=methods)
    monkeypatch.setattr(training, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda *_: None)
    monkeypatch.setattr(training, "train", real_train)
    kept = tmp_path / "b" / "exp" / "train" / ".dpo-beta0.1.tmp" / "run" / "checkpoints" / "step-0000001"
    assert kept.is_dir()
    logs: list[str] = []
    run_experiment(cfg, log=logs.append)
    assert "[resume] dpo-beta0.1" in logs
    weights = [
        load_file(root / "exp" / "train" / "dpo-beta0.1" / "run" / "model" / "model.safetensors")
        for root in (tmp_path / "a", tmp_path / "b")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _ran(logs: list[str]) -> list[str]:
    return [line.split()[1] for line in logs if line.startswith("[run]")]


def test_editing_a_reward_function_or_the_chat_template_reruns_what_depends_on_it(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Stages are fingerprinted by content: a reward function's source file and the tokenizer files."""
    import shutil
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    module = tmp_path / "lib" / "my_reward_fn.py"
    module.parent.mkdir()
    module.write_text("def score(prompts, responses):\n    return [1.0 + len(r) % 3 for r in responses]\n")
    monkeypatch.syspath_prepend(str(module.parent))
    methods = [{"method": "simpo", "betas": [2.0]}]
    cfg = _cfg(tmp_path, model, methods=methods, reward="my_reward_fn:score")
    run_experiment(cfg, log=lambda *_: None)

    module.write_text("def score(prompts, responses):\n    return [1.0 + len(r) % 5 for r in responses]\n")
    sys.modules.pop("my_reward_fn", None)
    logs: list[str] = []
    run_experiment(_cfg(tmp_path, model, methods=methods, reward="my_reward_fn:score"), log=logs.append)
    assert "[skip] prompts (cached)" in logs
    assert _ran(logs) == ["samples", "pairs", "simpo-beta2", "base", "simpo-beta2"]

    template = model / "chat_template.jinja"  # where transformers saves a tokenizer's chat template
    template.write_text(template.read_text() + "{# edited #}")
    logs.clear()
    run_experiment(_cfg(tmp_path, model, methods=methods, reward="my_reward_fn:score"), log=logs.append)
    assert "[skip] prompts (cached)" in logs and "samples" in _ran(logs)


def test_a_missing_reward_function_fails_before_any_sampling(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, reward="json:no_such_function")
    with pytest.raises(ValueError, match="has no attribute 'no_such_function'"):
        run_experiment(cfg, log=lambda *_: None)
    assert not (tmp_path / "exp" / "samples").exists()


def test_reward_model_is_not_an_experiment_method():
    with pytest.raises(ConfigError, match="reward_model trains a scorer, not a policy"):
        experiment_config_from_dict({"methods": [{"method": "reward_model", "betas": [0.1]}]})


def test_shared_reference_is_computed_like_the_training_runs_under_bf16(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The runs on one set of pairs share their reference log-probs through train()'s cache in the
    experiment's folder: the first run computes them (with the training runs' weights and autocast), the
    second loads them, and each run's first DPO loss is ln 2 under bf16."""
    import math

    methods = [{"method": "dpo", "betas": [0.1, 0.5]}]
    cfg = _cfg(tmp_path, tiny_model_dir, methods=methods)
    cfg.train["mixed_precision"] = "bf16"
    logs: list[str] = []
    precisions = []  # the held-out KL is told the autocast (bf16: the policy is re-scored, not the sampler's)
    real_ratios = heldout.log_ratios
    monkeypatch.setattr(
        heldout,
        "log_ratios",
        lambda *a, **kw: precisions.append(kw["mixed_precision"]) or real_ratios(*a, **kw),
    )
    run_experiment(cfg, log=logs.append)
    assert precisions == ["bf16", "bf16"]
    root = tmp_path / "exp"
    for name in ("dpo-beta0.1", "dpo-beta0.5"):
        rows = (root / "train" / name / "run" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[0])["loss"] == pytest.approx(math.log(2), abs=1e-6)
    (cached,) = (root / "cache" / "ref_logps").glob("*.safetensors")
    computed = [line for line in logs if line.startswith("reference log-probs for")]
    loaded = [line for line in logs if line.startswith("reference log-probs from the cache")]
    assert len(computed) == 1 and str(cached) in computed[0] and len(loaded) == 1 and str(cached) in loaded[0]
    assert not (root / "reference").exists()  # no stage of its own any more


def test_ppo_against_a_reward_model_learned_from_the_pairs(tmp_path, tiny_model_dir):
    """RLHF as the papers run it: a reward model trained on the experiment's pairs, PPO against it, every
    model evaluated with the experiment's own reward; PPO against the true reward beside it."""
    ppo = {
        "prompts_per_batch": 2,
        "epochs": 1,
        "minibatches": 1,
        "training": {"max_steps": 2, "batch_size": 2},
    }
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        methods=[
            {"method": "ppo", "betas": [0.05], "reward": "learned", **ppo},
            {"method": "ppo", "betas": [0.05], **ppo},
        ],
        reward_model={"max_steps": 1},
    )
    rows = run_experiment(cfg, log=lambda *a: None)
    root = tmp_path / "exp"
    assert (root / "reward_model" / "run" / "model" / "config.json").is_file()
    name = "ppo-epochs1-minibatches1-prompts_per_batch2-rmlearned-beta0.05"
    run_cfg = json.loads((root / "train" / name / "stage.json").read_text())
    rewards = run_cfg["inputs"]["config"]["ppo"]["rewards"]
    assert rewards == [f"reward_model:{root / 'reward_model' / 'run' / 'model'}"]
    assert "reward_model" in run_cfg["inputs"]  # retrained when the reward model changes
    assert {r["method"] for r in rows} == {"base", "ppo"} and len(rows) == 3
    # evaluation uses the experiment's reward (VADER here) for every model, not the learned one
    eval_rewards = json.loads((root / "eval" / name / "rewards.json").read_text())
    assert all(0.0 <= r <= 2.0 for r in eval_rewards)
    with pytest.raises(ConfigError, match="for online methods only"):
        _cfg(tmp_path, tiny_model_dir, methods=[{"method": "dpo", "reward": "learned"}])
    with pytest.raises(ConfigError, match="learning_rat"):  # the reward model's overrides, checked up front
        _cfg(tmp_path, tiny_model_dir, methods=[{"method": "ppo", "reward": "learned"}],
             reward_model={"learning_rat": 1e-5})  # fmt: skip


def test_kto_orpo_and_online_dpo_in_the_experiment(tmp_path, tiny_model_dir, monkeypatch):
    """The issue-14 methods as experiment entries: KTO on the samples labelled by each prompt's median reward
    (and on the pairs), ORPO on the pairs, online DPO on the prompts; each has its result row and its
    above-base claim, and online DPO is compared with offline DPO at equal KL."""
    module = tmp_path / "lib" / "length_reward.py"  # graded rewards: a random tiny model's VADER is ~flat
    module.parent.mkdir()
    module.write_text("def score(prompts, responses):\n    return [1.0 + len(r) % 7 for r in responses]\n")
    monkeypatch.syspath_prepend(str(module.parent))
    methods = [
        {"method": "dpo", "betas": [0.1]},
        {"method": "kto", "betas": [0.1]},
        {"method": "kto", "betas": [0.1], "kto_data": "pairs"},
        {"method": "orpo", "betas": [0.1]},
        {"method": "online_dpo", "betas": [0.1], "prompts_per_batch": 2, "training": {"max_steps": 2}},
    ]
    cfg = _cfg(tmp_path, tiny_model_dir, methods=methods, reward="length_reward:score")
    rows = run_experiment(cfg, log=lambda *_: None)
    root = tmp_path / "exp"
    assert [r["run"] for r in rows] == [
        "base",
        "dpo-beta0.1",
        "kto-beta0.1",
        "kto-datapairs-beta0.1",
        "orpo-beta0.1",
        "online_dpo-prompts_per_batch2-beta0.1",
    ]
    # KTO's records: each sample above its prompt's median reward desirable, below undesirable
    samples = read_jsonl(root / "samples" / "samples.jsonl")
    records = read_jsonl(root / "unpaired" / "unpaired.jsonl")
    expected, _ = label_by_median(samples)
    assert [(r["prompt"], r["completion"], r["label"]) for r in records] == [
        (r["prompt"], r["completion"], r["label"]) for r in expected if r["completion"].strip()
    ]
    ids = {
        (rec["prompt"], t): tuple(i) for rec in samples for t, i in zip(rec["responses"], rec["response_ids"])
    }
    assert all(tuple(r["completion_ids"]) == ids[(r["prompt"], r["completion"])] for r in records)
    trained = json.loads((root / "train" / "kto-beta0.1" / "run" / "data_summary.json").read_text())
    assert trained["train_records"] == len(records)
    assert trained["train_desirable"] == sum(r["label"] for r in records)
    first = json.loads((root / "train" / "kto-beta0.1" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: λ/2 per record
    n_pairs = len(read_jsonl(root / "pairs" / "pairs.jsonl"))  # kto_data: pairs -> 2 records per pair
    paired = json.loads((root / "train" / "kto-datapairs-beta0.1" / "run" / "data_summary.json").read_text())
    assert paired["train_records"] == 2 * n_pairs
    claims = json.loads((root / "claims.json").read_text())
    above = {c["scope"] for c in claims if c["claim"] == "c"}
    assert {"kto β=0.1", "orpo β=0.1", "online_dpo β=0.1", "dpo β=0.1"} <= above
    (f,) = [c for c in claims if c["claim"] == "f"]
    assert f["statement"] == "online DPO ≥ offline DPO at equal KL" and f["unit"] == "prompt"
    with pytest.raises(ConfigError, match="kto_data is for kto entries only"):
        _cfg(tmp_path, tiny_model_dir, methods=[{"method": "dpo", "kto_data": "pairs"}])
    with pytest.raises(ConfigError, match="kto_data must be one of samples, pairs"):
        _cfg(tmp_path, tiny_model_dir, methods=[{"method": "kto", "kto_data": "median"}])
    with pytest.raises(ConfigError, match="applies to kto with `kto_data: pairs` only"):
        _cfg(tmp_path, tiny_model_dir, methods=[{"method": "kto", "pairs": {"mode": "all"}}])
