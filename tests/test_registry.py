"""The method registry: every table that lists the methods lists the same ones, each pair section is its loss's
parameters, the reference decision is the section's, and option vocabularies and renamed keys are enforced."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from pathlib import Path

import pytest

import preftune
import preftune.losses as L
from preftune.cli import build_parser, main
from preftune.config import (
    KINDS,
    METHOD_SECTIONS,
    ONLINE_METHODS,
    ConfigError,
    TrainConfig,
    load_config,
)
from preftune.training.reference import uses_reference
from preftune.training.run import TRAINERS

ROOT = Path(__file__).resolve().parents[1]


def _docs_methods() -> set[str]:
    rows = (ROOT / "docs" / "methods.md").read_text().splitlines()
    return {m.group(1) for line in rows if (m := re.match(r"^\| `(\w+)`", line))}


def _help_methods() -> set[str]:
    text = build_parser().format_help()
    listing = text[text.index("methods (`method:`") :]
    return set(re.findall(r"^    (\w+) ", listing, flags=re.M))


def _readme_methods() -> set[str]:
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("method:"))
    return {name.strip() for name in line.split("#", 1)[1].split("|")}


def test_every_table_lists_the_same_methods():
    registry = set(METHOD_SECTIONS)
    assert len(registry) == 12
    assert set(TRAINERS) == registry
    assert _docs_methods() == registry
    assert _help_methods() == registry
    assert _readme_methods() == registry
    assert set(ONLINE_METHODS) == {"grpo", "ppo", "online_dpo"}


def test_a_missing_method_is_caught(monkeypatch):
    # the check above fails when one table lacks a method
    monkeypatch.delitem(TRAINERS, "orpo")
    assert set(TRAINERS) != set(METHOD_SECTIONS)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"preftune {preftune.__version__}"


@pytest.mark.parametrize("method", [m for m, c in METHOD_SECTIONS.items() if c.kind in ("pair", "unpaired")])
def test_section_fields_are_the_loss_keyword_parameters(method):
    loss = L.PAIR_METHODS[method].loss if method in L.PAIR_METHODS else L.UNPAIRED_METHODS[method]
    keywords = {
        name
        for name, p in inspect.signature(loss).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert {f.name for f in dataclasses.fields(METHOD_SECTIONS[method])} == keywords


def test_every_pair_method_has_a_loss_and_a_section():
    pairs = {m for m, c in METHOD_SECTIONS.items() if c.kind == "pair"}
    assert pairs == set(L.PAIR_METHODS)


@pytest.mark.parametrize("method", list(METHOD_SECTIONS))
def test_sections_declare_kind_summary_and_reference(method):
    section = METHOD_SECTIONS[method]
    assert section.method == method and section.kind in KINDS and section.summary
    cfg = TrainConfig(method=method)
    assert isinstance(cfg.method_config, section)
    assert getattr(cfg, method) is cfg.method_config
    assert all(getattr(cfg, other) is None for other in METHOD_SECTIONS if other != method)
    used = uses_reference(cfg)
    if method in L.PAIR_METHODS:
        assert used is (not L.PAIR_METHODS[method].reference_free)
    if section.kind == "online":
        for key in ("prompts_per_batch", "completions_per_prompt", "updates_per_batch"):
            assert isinstance(getattr(cfg.method_config, key), int) and getattr(cfg.method_config, key) >= 1
        assert used is (cfg.method_config.beta > 0)


def test_reference_use_per_method():
    expected = {
        "dpo": True, "ipo": True, "hinge": True, "rpo": True, "odpo": True, "simpo": False, "orpo": False,
        "kto": True, "reward_model": False, "grpo": False, "ppo": True, "online_dpo": True,
    }  # fmt: skip
    assert {m: uses_reference(TrainConfig(method=m)) for m in METHOD_SECTIONS} == expected
    grpo = load_config({"method": "grpo", "data": {"train": "x"}, "grpo": {"beta": 0.04}})
    assert uses_reference(grpo) is True


def test_an_unknown_method_is_an_error_not_a_silent_no():
    cfg = TrainConfig(method="dpo")
    cfg.method = "mystery"
    with pytest.raises(ValueError, match="unknown method 'mystery'"):
        uses_reference(cfg)
    with pytest.raises(ConfigError, match="method 'mystery' is not one of dpo, ipo"):
        load_config({"method": "mystery", "data": {"train": "x"}})


def _option_fields():
    for method, section in METHOD_SECTIONS.items():
        for f in dataclasses.fields(section):
            if "vocabulary" in f.metadata:
                yield method, f.name, f.metadata["vocabulary"]


def test_option_vocabularies_come_from_the_losses():
    found = {(m, name): vocab for m, name, vocab in _option_fields()}
    assert found == {
        ("odpo", "offset"): "ODPO_OFFSETS",
        ("grpo", "kl"): "KL_ESTIMATORS",
        ("grpo", "policy_loss"): "POLICY_LOSSES",
        ("grpo", "scale"): "SCALES",
        ("grpo", "baseline"): "BASELINES",
        ("grpo", "aggregation"): "AGGREGATIONS",
        ("ppo", "kl"): "PPO_KL_ESTIMATORS",
        ("online_dpo", "loss"): "ONLINE_DPO_LOSSES",
    }
    for (method, name), vocab in found.items():
        allowed = ", ".join(getattr(L, vocab))
        bad = {"method": method, "data": {"train": "x"}, method: {name: "nonsense"}}
        with pytest.raises(
            ConfigError, match=f"{method}.{name} must be one of {re.escape(allowed)}, got 'nonsense'"
        ):
            load_config(bad)


@pytest.mark.parametrize(
    "method,old,new,value",
    [
        ("grpo", "group_size", "completions_per_prompt", 4),
        ("grpo", "prompts_per_step", "prompts_per_batch", 2),
        ("grpo", "iterations", "updates_per_batch", 2),
        ("ppo", "samples_per_prompt", "completions_per_prompt", 2),
    ],
)
def test_renamed_keys_are_read_for_one_release(method, old, new, value):
    raw = {"method": method, "data": {"train": "x"}, method: {old: value}}
    with pytest.warns(FutureWarning, match=f"{method}.{old} is renamed {method}.{new}"):
        cfg = load_config(raw)
    assert getattr(cfg.method_config, new) == value
    assert old not in cfg.to_dict()[method] and cfg.to_dict()[method][new] == value
    with pytest.raises(ConfigError, match=f"{method}.{old} .* and {method}.{new} are both set"):
        load_config({"method": method, "data": {"train": "x"}, method: {old: value, new: value}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns nothing
        load_config({"method": method, "data": {"train": "x"}, method: {new: value}})


def test_to_dict_round_trips_with_the_section_under_its_name():
    cfg = load_config({"method": "odpo", "data": {"train": "x"}, "odpo": {"alpha": 0.5}})
    raw = cfg.to_dict()
    assert list(raw) == ["method", "model", "data", "training", "odpo"]
    assert load_config(raw) == cfg
    with pytest.raises(ConfigError, match="unknown key 'method_config'"):
        load_config({**raw, "method_config": {}})


def test_no_method_name_switches_outside_the_registry():
    # trainers, data preparation and the CLI ask the section (kind, uses_reference, requires_scores, checks),
    # never `method == "..."`
    pattern = re.compile(r"""\bmethod\s*(==|!=)\s*["']|\bmethod\s+(not\s+)?in\s+\(""")
    offenders = []
    for path in (ROOT / "src" / "preftune").rglob("*.py"):
        rel = path.relative_to(ROOT / "src" / "preftune").as_posix()
        if rel == "config.py" or rel.startswith("experiments/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == []


def _config_keys() -> dict[str, object]:
    """Every key of a training config (``section.key``, nested ``model.lora.r``) and its default as YAML holds
    it (a method section's unset keys: null)."""
    import typing

    def walk(obj, prefix: str) -> dict[str, object]:
        out = {}
        values = obj.to_section() if hasattr(obj, "to_section") else vars(obj)
        for f in dataclasses.fields(obj):
            if f.name == "method_config":
                continue
            value = values[f.name]
            if dataclasses.is_dataclass(typing.get_type_hints(type(obj))[f.name]):
                out.update(walk(getattr(obj, f.name), f"{prefix}{f.name}."))
            else:
                out[f"{prefix}{f.name}"] = value
        return out

    base = TrainConfig()
    keys = {
        k: v
        for section in ("model", "data", "training", "generation")
        for k, v in walk(getattr(base, section), f"{section}.").items()
    }
    for name, section in METHOD_SECTIONS.items():
        keys.update(walk(section(), f"{name}."))
    return keys


def test_the_config_reference_lists_every_key_with_its_default():
    """docs/config.md has one row per config key, its default as YAML writes it, and a meaning; no row for
    a key that does not exist."""
    import json

    rows = {
        m.group(1): (m.group(2), m.group(3).strip())
        for line in (ROOT / "docs" / "config.md").read_text().splitlines()
        if (m := re.match(r"^\| `([\w.]+)` \| `(.*)` \| (.*) \|$", line))
    }
    keys = _config_keys()
    assert set(rows) == set(keys), (sorted(set(keys) - set(rows)), sorted(set(rows) - set(keys)))

    def yaml_text(v) -> str:
        return (
            "null"
            if v is None
            else str(v).lower()
            if isinstance(v, bool)
            else json.dumps(v)
            if isinstance(v, (list, dict))
            else str(v)
        )

    wrong = {k: (rows[k][0], yaml_text(v)) for k, v in keys.items() if rows[k][0] != yaml_text(v)}
    assert not wrong, wrong
    columns = [k for k in rows if k.startswith("data.columns.")]  # one meaning for the column names
    assert all(rows[k][1] for k in rows if k not in columns[1:]), [k for k in rows if not rows[k][1]]
