"""preftune.config: defaults, unknown keys, types, required values, method sections, overrides."""

from __future__ import annotations

import pytest
import yaml

from preftune.config import (
    ConfigError,
    DPOConfig,
    SimPOConfig,
    TrainConfig,
    apply_overrides,
    load_train_config,
    parse_override,
    train_config_from_dict,
)

MINIMAL = {"data": {"train": "pairs.jsonl"}}


def build(**sections) -> TrainConfig:
    raw = {"data": {"train": "pairs.jsonl"}}
    raw.update(sections)
    return train_config_from_dict(raw)


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = train_config_from_dict(MINIMAL)
    assert cfg.method == "dpo"
    assert cfg.method_config == DPOConfig(beta=0.1, label_smoothing=0.0)
    assert cfg.dpo == DPOConfig() and cfg.simpo is None and cfg.ipo is None
    assert cfg.model.name_or_path is None and cfg.model.dtype == "float32"
    assert cfg.model.disable_dropout is True and cfg.model.lora.enabled is False
    assert cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32
    assert cfg.data.train == "pairs.jsonl" and cfg.data.eval is None
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)
    assert cfg.data.columns.chosen == "chosen"
    t = cfg.training
    assert t.learning_rate == 5e-6 and isinstance(t.learning_rate, float)
    assert (t.batch_size, t.grad_accum, t.epochs, t.max_steps) == (4, 1, 1, None)
    assert t.adam_betas == [0.9, 0.999] and t.lr_scheduler == "linear" and t.max_grad_norm == 1.0
    assert t.precompute_ref is True and t.report_to == [] and t.save_every == 0
    # every method gets its section with defaults when none is given
    assert build(method="simpo").method_config == SimPOConfig(beta=2.0, gamma=1.0)
    assert build(method="odpo").odpo.offset == "log"
    assert build(method="reward_model").reward_model.use_margin is True
    assert build(method="rpo").rpo.alpha == 1.0
    # an empty section (YAML `dpo:` with nothing under it) is the defaults
    assert build(dpo=None).dpo == DPOConfig()


def test_to_dict_round_trips():
    cfg = build(method="ipo", ipo={"beta": 0.3}, training={"max_steps": 7})
    again = train_config_from_dict({k: v for k, v in cfg.to_dict().items() if v is not None})
    assert again == cfg


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match="'learning_rate'.*top level"):
        train_config_from_dict({**MINIMAL, "learning_rate": 1e-5})


@pytest.mark.parametrize(
    "section, values, key, where",
    [
        ("training", {"lr": 1e-5}, "'lr'", "section 'training'"),
        ("data", {"train": "x.jsonl", "test": "y.jsonl"}, "'test'", "section 'data'"),
        ("model", {"lora": {"rank": 8}}, "'rank'", "section 'model.lora'"),
        ("dpo", {"gamma": 1.0}, "'gamma'", "section 'dpo'"),
    ],
)
def test_unknown_key_in_a_section_is_named(section, values, key, where):
    raw = {**MINIMAL, section: values}
    with pytest.raises(ConfigError) as info:
        train_config_from_dict(raw)
    assert key in str(info.value) and where in str(info.value)
    assert "valid keys" in str(info.value)


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"training": {"batch_size": "four"}}, "training.batch_size"),
        ({"training": {"batch_size": 2.5}}, "training.batch_size"),
        ({"training": {"batch_size": True}}, "training.batch_size"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate"),
        ({"training": {"precompute_ref": "yes"}}, "training.precompute_ref"),
        ({"training": {"adam_betas": {"a": 1}}}, "training.adam_betas"),
        ({"training": {"adam_betas": [0.9, "x"]}}, "training.adam_betas[1]"),
        ({"training": {"seed": None}}, "training.seed"),
        ({"training": 5}, "training"),
        ({"model": {"lora": "on"}}, "model.lora"),
        ({"dpo": {"beta": [0.1]}}, "dpo.beta"),
        ({"data": {"train": "x.jsonl", "max_length": "long"}}, "data.max_length"),
    ],
)
def test_wrong_types_name_the_key(sections, key):
    with pytest.raises(ConfigError) as info:
        train_config_from_dict({**MINIMAL, **sections})
    assert key in str(info.value)


def test_lenient_conversions():
    cfg = build(
        training={"max_steps": 3.0, "learning_rate": 1, "report_to": "tensorboard", "max_grad_norm": None}
    )
    assert cfg.training.max_steps == 3 and isinstance(cfg.training.max_steps, int)
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.report_to == ["tensorboard"]
    assert cfg.training.max_grad_norm is None


def test_missing_data_train():
    with pytest.raises(ConfigError, match="data.train is required"):
        train_config_from_dict({})
    with pytest.raises(ConfigError, match="data.train is required"):
        train_config_from_dict({"data": {"eval": "e.jsonl"}})


def test_section_of_another_method_is_an_error():
    with pytest.raises(ConfigError, match="simpo.*method is 'dpo'"):
        train_config_from_dict({**MINIMAL, "simpo": {"beta": 2.0}})
    with pytest.raises(ConfigError, match="dpo.*method is 'ipo'"):
        train_config_from_dict({**MINIMAL, "method": "ipo", "dpo": {"beta": 0.1}})


def test_bad_method_name():
    with pytest.raises(ConfigError, match="method 'trpo' is not one of dpo, ipo"):
        train_config_from_dict({**MINIMAL, "method": "trpo"})


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"dpo": {"beta": 0.0}}, "dpo.beta must be > 0"),
        ({"dpo": {"label_smoothing": 0.5}}, r"dpo.label_smoothing must be in \[0, 0.5\)"),
        (
            {"method": "odpo", "odpo": {"offset": "sqrt"}},
            "odpo.offset must be one of log, identity, log_ratio",
        ),
        ({"method": "odpo", "odpo": {"alpha": -1.0}}, "odpo.alpha must be >= 0"),
        ({"method": "rpo", "rpo": {"alpha": -0.5}}, "rpo.alpha must be >= 0"),
        ({"training": {"batch_size": 0}}, "training.batch_size must be >= 1"),
        ({"training": {"max_steps": 0}}, "training.max_steps must be >= 1"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate must be > 0"),
        ({"training": {"lr_scheduler": "step"}}, "training.lr_scheduler"),
        ({"training": {"adam_betas": [0.9]}}, "training.adam_betas must have two values"),
        ({"training": {"report_to": ["mlflow"]}}, "unknown tracker 'mlflow'"),
        ({"training": {"sharding": "zero3"}}, "training.sharding must be one of none, fsdp"),
        ({"training": {"cpu_offload": True}}, "training.cpu_offload needs training.sharding: fsdp"),
        (
            {"training": {"reshard_after_forward": False}},
            "training.reshard_after_forward: false needs training.sharding: fsdp",
        ),
        ({"model": {"dtype": "int8"}}, "model.dtype"),
        ({"data": {"train": "x", "max_length": 64, "max_prompt_length": 64}}, "max_prompt_length"),
        ({"data": {"train": "x", "eval_fraction": 1.0}}, "eval_fraction"),
    ],
)
def test_value_checks(sections, match):
    with pytest.raises(ConfigError, match=match):
        train_config_from_dict({**MINIMAL, **sections})


def test_errors_name_the_source(tmp_path):
    path = write(tmp_path, "data: {train: x.jsonl}\ntraining: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=f"{path}.*'bogus'"):
        load_train_config(path)


def test_overrides():
    assert parse_override("dpo.beta=0.5") == (["dpo", "beta"], 0.5)
    assert parse_override("training.max_steps=3") == (["training", "max_steps"], 3)
    assert parse_override("model.name_or_path=") == (["model", "name_or_path"], None)
    assert parse_override("data.train=a=b.jsonl") == (["data", "train"], "a=b.jsonl")
    raw = apply_overrides({"data": {"train": "x"}}, ["dpo.beta=0.5", "model.lora.enabled=true"])
    assert raw == {"data": {"train": "x"}, "dpo": {"beta": 0.5}, "model": {"lora": {"enabled": True}}}
    for bad in ("dpo.beta", "=3", "dpo..beta=1", ".beta=1"):
        with pytest.raises(ConfigError, match="override"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="'train' is not a section"):
        apply_overrides({"data": {"train": "x"}}, ["data.train.path=y"])


def test_yaml_file_with_overrides(tmp_path):
    path = write(
        tmp_path,
        "method: dpo\n"
        "data:\n  train: pairs.jsonl\n"
        "training:\n  learning_rate: 5e-6\n  max_steps: 10\n"
        "dpo:\n  beta: 0.1\n",
    )
    cfg = load_train_config(path)
    assert cfg.training.learning_rate == 5e-6  # PyYAML reads `5e-6` as a string
    assert cfg.training.max_steps == 10 and cfg.dpo.beta == 0.1
    cfg = load_train_config(
        path, ["dpo.beta=0.5", "training.max_steps=3", "training.learning_rate=1e-4", "training.seed=7"]
    )
    assert cfg.dpo.beta == 0.5 and cfg.training.max_steps == 3
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.seed == 7
    # an override can also switch the method, but then the old section is an error
    with pytest.raises(ConfigError, match="method is 'ipo'"):
        load_train_config(path, ["method=ipo"])
    cfg = load_train_config(path, ["method=ipo", "dpo=null", "ipo.beta=0.2"])
    assert cfg.method == "ipo" and cfg.ipo.beta == 0.2
    with pytest.raises(ConfigError, match="'betta'"):
        load_train_config(path, ["dpo.betta=0.5"])


@pytest.mark.parametrize("text", ["1e-5", "5e-6", "3.0E-4", "2e0"])
def test_float_strings(text):
    cfg = build(training={"learning_rate": text}, dpo={"beta": text})
    assert cfg.training.learning_rate == float(text) and isinstance(cfg.training.learning_rate, float)
    assert cfg.dpo.beta == float(text)
    # the same through a YAML file, where PyYAML leaves these as strings
    cfg = train_config_from_dict(yaml.safe_load(f"data: {{train: x}}\ntraining: {{learning_rate: {text}}}"))
    assert cfg.training.learning_rate == float(text)


def test_float_string_checks_still_apply():
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        build(dpo={"beta": "-2e3"})
    with pytest.raises(ConfigError, match="training.batch_size: expected an integer"):
        build(training={"batch_size": "4"})


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_train_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="data.train is required"):
        load_train_config(write(tmp_path, ""))


def test_grpo_k1_as_a_loss_term_is_refused_with_the_reason():
    online = {"method": "grpo", "data": {"train": "p.jsonl"}}
    with pytest.raises(ConfigError, match=r"grpo.kl: k1 with grpo.beta > 0 .*zero expected gradient"):
        train_config_from_dict({**online, "grpo": {"kl": "k1", "beta": 0.04}})
    assert train_config_from_dict({**online, "grpo": {"kl": "k1", "beta": 0.0}}).grpo.kl == "k1"  # no KL term
    assert train_config_from_dict({**online, "grpo": {"kl": "k2", "beta": 0.04}}).grpo.kl == "k2"
    ppo = train_config_from_dict({"method": "ppo", "data": {"train": "p.jsonl"}, "ppo": {"kl": "k1"}})
    assert ppo.ppo.kl == "k1" and ppo.ppo.beta > 0  # k1 stays PPO's reward shaping


def test_leave_one_out_implies_scale_none_unless_set():
    online = {"method": "grpo", "data": {"train": "p.jsonl"}}
    cfg = train_config_from_dict({**online, "grpo": {"baseline": "leave_one_out"}})
    assert cfg.grpo.scale == "none"
    explicit = train_config_from_dict({**online, "grpo": {"baseline": "leave_one_out", "scale": "group"}})
    assert explicit.grpo.scale == "group"  # set: kept
    assert train_config_from_dict(online).grpo.scale == "group"
    again = train_config_from_dict(cfg.to_dict())  # the written config holds null: the baseline's own
    assert again == cfg and cfg.to_dict()["grpo"]["scale"] is None
    assert (
        explicit.to_dict()["grpo"]["scale"] == "group"
        and train_config_from_dict(explicit.to_dict()) == explicit
    )


def test_kl_horizon_is_in_batches_and_the_old_key_is_deprecated():
    online = {"method": "ppo", "data": {"train": "p.jsonl"}}
    assert train_config_from_dict(online).ppo.kl_horizon_batches == 20.0
    with pytest.warns(FutureWarning, match="ppo.kl_horizon is deprecated.*kl_horizon_batches: 312.5"):
        cfg = train_config_from_dict({**online, "ppo": {"kl_horizon": 10000}})  # at 32 completions a batch
    assert cfg.ppo.kl_horizon_batches == 312.5 and cfg.ppo.kl_horizon is None
    assert train_config_from_dict(cfg.to_dict()) == cfg  # the written config needs no deprecated key
    with pytest.raises(ConfigError, match="both set"):
        train_config_from_dict({**online, "ppo": {"kl_horizon": 100, "kl_horizon_batches": 5}})
    with pytest.raises(ConfigError, match="both set"):  # set to the default value: still both set
        train_config_from_dict({**online, "ppo": {"kl_horizon": 100, "kl_horizon_batches": 20}})
    with pytest.raises(ConfigError, match="kl_horizon_batches must be > 0"):
        train_config_from_dict({**online, "ppo": {"kl_horizon_batches": 0}})


def test_a_rebuilt_grpo_config_takes_the_new_policy_losss_own_clip_range(tmp_path):
    """An unset clip range / aggregation / scale is written as null, so a config rebuilt with overrides (a
    TrainConfig, or a run's saved config.yaml) with another policy_loss or baseline takes that one's own
    values, not the first one's; a value set by hand stays."""
    from preftune import load_config
    from preftune.losses import POLICY_LOSSES
    from preftune.training.rundir import _check_resume_config

    grpo = load_config({"method": "grpo", "data": {"train": "prompts.jsonl"}})
    assert (grpo.grpo.epsilon_low, grpo.grpo.aggregation, grpo.grpo.scale) == (0.2, "token_mean", "group")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(grpo.to_dict()))
    for start in (grpo, saved):
        gspo = load_config(start, ["grpo.policy_loss=gspo"]).grpo
        own = POLICY_LOSSES["gspo"]
        assert (gspo.epsilon_low, gspo.epsilon_high, gspo.aggregation) == (3e-4, 4e-4, "sequence_mean")
        assert (own.epsilon_low, own.epsilon_high, own.aggregation) == (3e-4, 4e-4, "sequence_mean")
        assert (
            load_config(start, ["grpo.baseline=leave_one_out"]).grpo.scale == "none"
        )  # RLOO, not GRPO × G/(G−1)
    mine = load_config(grpo, ["grpo.epsilon_high=0.28"])
    assert load_config(mine, ["grpo.policy_loss=cispo"]).grpo.epsilon_high == 0.28
    # set by hand to the default's value: still set (kept under another policy loss / baseline)
    explicit = load_config({**grpo.to_dict(), "grpo": {"epsilon_high": 0.2, "scale": "group"}})
    again = load_config(explicit, ["grpo.policy_loss=cispo", "grpo.baseline=leave_one_out"]).grpo
    assert (again.epsilon_high, again.epsilon_low, again.scale) == (0.2, 1.0, "group")
    # a TrainConfig changed in place, then rebuilt (what train(cfg) does first): the unset keys follow it
    changed = load_config(grpo)
    changed.grpo.policy_loss, changed.grpo.baseline = "gspo", "leave_one_out"
    rebuilt = load_config(changed).grpo
    assert (rebuilt.epsilon_low, rebuilt.aggregation, rebuilt.scale) == (3e-4, "sequence_mean", "none")
    # a run saved by an earlier version (the resolved values written out) still resumes with the same config
    old = grpo.to_dict()
    old["grpo"].update(epsilon_low=0.2, epsilon_high=0.2, aggregation="token_mean", scale="group")
    saved.write_text(yaml.safe_dump(old))
    _check_resume_config(saved, grpo)
