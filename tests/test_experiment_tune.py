"""Tuning on validation prompts: the validation split, the candidates, the selection rule, and a tiny tune run
end to end (every candidate judged on validation prompts, only the chosen ones on held-out prompts)."""

from __future__ import annotations

import json

import pytest
from test_experiment import _cfg

from preftune.config import ConfigError
from preftune.experiments.config import experiment_config_from_dict, load_experiment_config, plan_runs
from preftune.experiments.context import Context
from preftune.experiments.data_stages import prompts_stage
from preftune.experiments.pipeline import run_experiment
from preftune.experiments.prompts import load_prompts, split_validation
from preftune.experiments.stages import fingerprint
from preftune.experiments.tuning import choose, mark_chosen


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


# ---- the validation split --------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_keeps_order():
    prompts = [f"p{i}" for i in range(8)]
    train, val = split_validation(prompts, 0.25, seed=7)
    assert len(train) == 6 and len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val, key=prompts.index) == prompts
    assert train == sorted(train, key=prompts.index) and val == sorted(val, key=prompts.index)
    assert split_validation(prompts, 0.25, seed=7) == (train, val)  # deterministic
    assert {tuple(split_validation(prompts, 0.25, seed=s)[1]) for s in range(10)} != {tuple(val)}  # seeded
    assert split_validation(prompts, 0.0, seed=7) == (prompts, [])
    assert len(split_validation(prompts, 0.01, seed=7)[1]) == 1  # at least one
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_validation(["a", "b"], 0.9, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_validation(prompts, 1.0, seed=0)


def test_prompts_stage_sets_validation_aside_and_keeps_fraction_zero_as_it_was(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path / "a", tiny_model_dir, prompts={"n_train": 8, "n_heldout": 3})
    prompts_stage(Context(cfg, log=lambda *_: None))
    root = tmp_path / "a" / "exp" / "prompts"
    stage = json.loads((root / "stage.json").read_text())
    # fraction 0: the inputs (so the fingerprint) of the stage before validation existed, no validation file
    assert set(stage["inputs"]) == {"files", "n_train", "n_heldout", "code"}
    assert stage["fingerprint"] == fingerprint(stage["inputs"])
    assert not (root / "validation.txt").exists()
    first8 = load_prompts(None, "train")[:8]
    assert (root / "train.txt").read_text().splitlines() == first8

    prompts = {"n_train": 8, "n_heldout": 3, "validation_fraction": 0.5}
    prompts_stage(Context(_cfg(tmp_path / "b", tiny_model_dir, prompts=prompts), log=lambda *_: None))
    root = tmp_path / "b" / "exp" / "prompts"
    train, val, held = (_lines(root / f"{s}.txt") for s in ("train", "validation", "heldout"))
    assert len(train) == len(val) == 4 and sorted(train + val) == sorted(first8)
    assert not set(val) & set(train) and not set(val) & set(held)
    assert json.loads((root / "stage.json").read_text())["inputs"]["validation_fraction"] == 0.5


# ---- candidates and config -------------------------------------------------------------------------------


def _tune_raw(**extra) -> dict:
    raw = {
        "prompts": {"validation_fraction": 0.25},
        "train": {"learning_rate": 1e-5},
        "tune": {"learning_rates": [1e-5, 3e-5], "simpo_gamma_beta_ratios": [0.5, 1.0], "max_kl": 3.0},
        "methods": [
            {"method": "dpo", "betas": [0.1, 0.5]},
            {"method": "simpo", "betas": [2.0], "gamma": 0.3},
            {"method": "grpo", "tune": {"learning_rates": [2e-5], "max_kl": 1.0}},
        ],
    }
    raw.update(extra)
    return raw


def test_every_candidate_is_a_planned_run_with_its_group():
    cfg = experiment_config_from_dict(_tune_raw())
    runs = plan_runs(cfg)
    assert [(r.name, r.group) for r in runs] == [
        ("dpo-beta0.1-lr1e-05", "dpo-beta0.1"),
        ("dpo-beta0.1-lr3e-05", "dpo-beta0.1"),
        ("dpo-beta0.5-lr1e-05", "dpo-beta0.5"),
        ("dpo-beta0.5-lr3e-05", "dpo-beta0.5"),
        ("simpo-gamma1.0-beta2-lr1e-05", "simpo-beta2"),  # γ = ratio · β replaces the entry's 0.3
        ("simpo-gamma2.0-beta2-lr1e-05", "simpo-beta2"),
        ("simpo-gamma1.0-beta2-lr3e-05", "simpo-beta2"),
        ("simpo-gamma2.0-beta2-lr3e-05", "simpo-beta2"),
        ("grpo-beta0.1-lr2e-05", "grpo-beta0.1"),  # the entry's own grid
    ]
    assert [r.run.training["learning_rate"] for r in runs[:2]] == [1e-5, 3e-5]
    assert runs[5].run.options == {"gamma": 2.0} and runs[5].run.betas == [2.0]
    assert cfg.methods[1].options == {"gamma": 0.3}  # the entry itself is left as it was
    # no learning rates listed: the entry's own, still named by it
    own = experiment_config_from_dict(_tune_raw(tune={}, methods=[{"method": "dpo"}]))
    assert [r.name for r in plan_runs(own)] == ["dpo-beta0.1-lr1e-05"]
    # without `tune`: today's names, no group
    plain = experiment_config_from_dict({"methods": [{"method": "dpo"}]})
    assert [(r.name, r.group) for r in plan_runs(plain)] == [("dpo-beta0.1", None)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompts": {}}, "set prompts.validation_fraction > 0"),
        ({"prompts": {"validation_fraction": 1.0}}, r"validation_fraction must be in \[0, 1\)"),
        ({"tune": None}, "has `tune` keys but the experiment has no `tune` section"),
        ({"tune": {"learning_rates": [0.0]}}, "learning_rates must be positive"),
        ({"tune": {"max_kl": 0}}, "max_kl must be > 0"),
        ({"tune": {"learnign_rates": [1e-5]}}, "unknown key"),
        ({"methods": [{"method": "dpo", "tune": {"simpo_gamma_beta_ratios": [1]}}]}, "for simpo entries"),
    ],
)
def test_bad_tune_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        experiment_config_from_dict(_tune_raw(**change))


def test_tune_preset_is_quick_with_a_validation_split_and_a_grid():
    tune, quick = load_experiment_config("tune"), load_experiment_config("quick")
    for key in ("model", "reward", "sample", "pairs", "eval"):
        assert getattr(tune, key) == getattr(quick, key), key
    assert tune.prompts.n_heldout == quick.prompts.n_heldout
    n_train = round(tune.prompts.n_train * (1 - tune.prompts.validation_fraction))
    assert n_train == quick.prompts.n_train  # the methods train on as many prompts as in quick
    assert [m.method for m in tune.methods] == [m.method for m in quick.methods]
    runs = plan_runs(tune)
    assert len({r.group for r in runs}) == len(quick.methods) and len(runs) == 22


# ---- the selection rule ----------------------------------------------------------------------------------


def _rows(*points):
    return [{"reward_mean": r, "kl_mean": kl} for r, kl in points]


def test_choose_takes_the_best_reward_within_the_kl_bound():
    rows = _rows((1.30, 0.5), (1.40, 1.5), (1.50, 2.5))
    assert choose(rows, max_kl=2.0) == 1  # 1.50 is beyond the bound
    assert choose(rows, max_kl=3.0) == 2
    assert choose(rows, max_kl=1.5) == 1  # the bound is inclusive
    assert choose(_rows((1.2, 0.1), (1.4, 0.9), (1.3, 0.2)), max_kl=1.0) == 1  # neither last nor lowest KL
    assert choose(_rows((1.4, 0.3), (1.4, 0.2)), max_kl=1.0) == 0  # a tie: the first listed
    # none within the bound: the lowest KL, whatever its reward
    assert choose(_rows((1.5, 2.6), (1.3, 2.2), (1.6, 4.0)), max_kl=2.0) == 1
    with pytest.raises(ValueError, match="no candidates"):
        choose([], 1.0)


def test_mark_chosen_picks_one_per_group_with_the_group_bound():
    rows = [
        {"group": "a", "max_kl": 1.0, "reward_mean": 1.3, "kl_mean": 0.8},
        {"group": "b", "max_kl": 5.0, "reward_mean": 1.6, "kl_mean": 3.0},
        {"group": "a", "max_kl": 1.0, "reward_mean": 1.5, "kl_mean": 1.2},
        {"group": "b", "max_kl": 5.0, "reward_mean": 1.2, "kl_mean": 0.5},
        {"group": "c", "max_kl": 0.1, "reward_mean": 1.9, "kl_mean": 0.7},
        {"group": "c", "max_kl": 0.1, "reward_mean": 1.1, "kl_mean": 0.4},
    ]
    marked = mark_chosen(rows)
    assert [r["chosen"] for r in marked] == [True, True, False, False, False, True]
    assert [r["within_kl"] for r in marked] == [True, True, False, True, False, False]
    assert [r["reward_mean"] for r in marked] == [r["reward_mean"] for r in rows]  # rows kept, in order


# ---- end to end ------------------------------------------------------------------------------------------


def _tiny_tune(tmp_path, model_dir):
    return _cfg(
        tmp_path,
        model_dir,
        prompts={"n_train": 6, "n_heldout": 3, "validation_fraction": 0.34},
        tune={"learning_rates": [1e-4, 1e-2], "simpo_gamma_beta_ratios": [0.25, 0.5], "max_kl": 50.0},
        methods=[
            {"method": "dpo", "betas": [0.1]},
            {"method": "simpo", "betas": [2.0], "tune": {"learning_rates": [1e-3]}},
        ],
    )


def test_tune_run_chooses_on_validation_and_reports_only_the_chosen(tmp_path, tiny_model_dir):
    logs: list[str] = []
    rows = run_experiment(_tiny_tune(tmp_path, tiny_model_dir), log=logs.append)
    root = tmp_path / "exp"
    val, held = _lines(root / "prompts" / "validation.txt"), _lines(root / "prompts" / "heldout.txt")
    assert len(val) == 2 and not set(val) & set(held)
    # validation prompts are never trained on: the pairs come from the training prompts only
    sampled = {json.loads(line)["prompt"] for line in _lines(root / "samples" / "samples.jsonl")}
    assert sampled == set(_lines(root / "prompts" / "train.txt")) and not sampled & set(val)

    tuning = json.loads((root / "tuning.json").read_text())
    assert tuning[0]["run"] == "base" and tuning[0]["n_samples"] == 4  # 2 validation prompts x 2 samples
    candidates = tuning[1:]
    assert [c["run"] for c in candidates] == [
        "dpo-beta0.1-lr0.0001",
        "dpo-beta0.1-lr0.01",
        "simpo-gamma0.5-beta2-lr0.001",
        "simpo-gamma1.0-beta2-lr0.001",
    ]
    assert [c["group"] for c in candidates] == ["dpo-beta0.1"] * 2 + ["simpo-beta2"] * 2
    assert [c["learning_rate"] for c in candidates] == [1e-4, 1e-2, 1e-3, 1e-3]
    assert [c["gamma"] for c in candidates] == [None, None, 0.5, 1.0]
    chosen = []
    for group in ("dpo-beta0.1", "simpo-beta2"):
        members = [c for c in candidates if c["group"] == group]
        assert [c["chosen"] for c in members].count(True) == 1
        assert members[choose(members, 50.0)]["chosen"]
        chosen.append(next(c["run"] for c in members if c["chosen"]))
    # the validation numbers are an evaluation on the validation prompts, like the held-out one
    for c in candidates:
        stage = json.loads((root / "validation" / c["run"] / "stage.json").read_text())
        summary, inputs = stage["summary"], stage["inputs"]
        assert inputs["split"] == "validation" and summary["reward_mean"] == c["reward_mean"]
        prompts = [json.loads(x)["prompt"] for x in (root / "validation" / c["run"] / "samples.jsonl").open()]
        assert prompts == val
    # held-out: the base model and the chosen candidates only, once each
    assert sorted(p.name for p in (root / "eval").iterdir()) == sorted(["base", *chosen])
    assert [r["run"] for r in rows] == ["base", *chosen] and all(r["n_samples"] == 6 for r in rows)
    assert "## Tuning (validation prompts)" in (root / "report.md").read_text()
    assert (root / "tuning.csv").read_text().splitlines()[0].startswith("method,beta,reward_mean")

    # a rerun skips every stage and gives the same rows
    logs.clear()
    assert run_experiment(_tiny_tune(tmp_path, tiny_model_dir), log=logs.append) == rows
    assert not [line for line in logs if line.startswith("[run]")]
