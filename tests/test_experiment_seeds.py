"""Seeds and pairs variants in the sentiment experiment: config, stage names, fingerprints, the aggregation
over seeds, the plot, and a two-seed experiment end to end on the tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from test_experiment import _cfg

from preftune import metrics
from preftune.config import ConfigError
from preftune.experiments.config import (
    PairsConfig,
    experiment_config_from_dict,
    load_experiment_config,
    pairs_suffix,
    plan_runs,
    run_pairs,
    train_config,
)
from preftune.experiments.pairs import subsample_pairs
from preftune.experiments.pipeline import agreement_se, run_experiment
from preftune.experiments.report import aggregate_seeds, plot_frontier, write_report_md

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---- config ----------------------------------------------------------------------------------------------


def test_seeds_default_to_the_single_seed():
    cfg = experiment_config_from_dict({"seed": 3, "methods": [{"method": "dpo", "betas": [0.1]}]})
    (run,) = plan_runs(cfg)
    assert cfg.seeds is None and run.seed == 3 and run.name == run.label == "dpo-beta0.1"
    assert (run.pairs_stage, run.data_file, run.pairs_variant) == ("pairs", "pairs/pairs.jsonl", None)
    assert train_config(cfg, run.run, run.beta, output_dir="x").training.seed == 3  # as before seeds existed
    one = experiment_config_from_dict({"seeds": [5], "methods": [{"method": "dpo", "betas": [0.1]}]})
    assert [(r.name, r.seed) for r in plan_runs(one)] == [("dpo-beta0.1", 5)]  # one seed: no suffix


def test_several_seeds_name_every_run_per_seed():
    cfg = experiment_config_from_dict(
        {"seeds": [0, 1, 2], "methods": [{"method": "dpo", "betas": [0.1, 0.5]}, {"method": "grpo"}]}
    )
    runs = plan_runs(cfg)
    assert [r.name for r in runs[:3]] == ["dpo-beta0.1-seed0", "dpo-beta0.5-seed0", "grpo-beta0.1-seed0"]
    assert [r.seed for r in runs] == [0] * 3 + [1] * 3 + [2] * 3
    assert {r.label for r in runs} == {"dpo-beta0.1", "dpo-beta0.5", "grpo-beta0.1"}
    seeds = {train_config(cfg, r.run, r.beta, output_dir="x", seed=r.seed).training.seed for r in runs}
    assert seeds == {0, 1, 2}
    for bad in ([], [1, 1]):
        with pytest.raises(ConfigError, match="seeds must be a non-empty list of distinct"):
            experiment_config_from_dict({"seeds": bad})
    with pytest.raises(ConfigError, match="training.seed is set by the experiment"):
        experiment_config_from_dict({"methods": [{"method": "dpo", "training": {"seed": 4}}]})


def test_per_method_pairs_override_the_experiment_pairs():
    cfg = experiment_config_from_dict(
        {
            "pairs": {"mode": "best_vs_worst"},
            "methods": [
                {"method": "dpo"},
                {"method": "dpo", "pairs": {"mode": "all"}},
                {"method": "odpo", "pairs": {"mode": "all", "max_pairs": 48}},
                {"method": "dpo", "pairs": {"max_pairs": 64}},
                {"method": "grpo"},
            ],
        }
    )
    runs = plan_runs(cfg)
    assert [r.name for r in runs] == [
        "dpo-beta0.1",
        "dpo-all-beta0.1",
        "odpo-all-n48-beta0.1",
        "dpo-n64-beta0.1",
        "grpo-beta0.1",
    ]
    assert [r.pairs_stage for r in runs] == ["pairs", "pairs-all", "pairs-all-n48", "pairs-n64", None]
    assert runs[2].pairs == PairsConfig("all", 48) and runs[2].data_file == "pairs-all-n48/pairs.jsonl"
    assert runs[3].pairs == PairsConfig("best_vs_worst", 64)  # keys not given come from the experiment
    assert run_pairs(cfg, cfg.methods[4]) is None  # online: no pairs
    default = PairsConfig("all", 48)
    assert pairs_suffix(default, PairsConfig("all", 48)) == ""
    assert pairs_suffix(default, PairsConfig("all", None)) == "-nall"
    assert pairs_suffix(default, PairsConfig("best_vs_worst", 8)) == "-best_vs_worst-n8"


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"method": "grpo", "pairs": {"mode": "all"}},
            "`pairs` is for offline methods only; grpo trains online",
        ),
        ({"method": "dpo", "pairs": {"mode": "some"}}, "mode must be all or best_vs_worst"),
        ({"method": "dpo", "pairs": {"max_pairs": 0}}, "max_pairs must be >= 1"),
        ({"method": "dpo", "pairs": {"n": 3}}, "unknown key"),
    ],
)
def test_bad_pairs_settings_are_refused(entry, message):
    with pytest.raises(ConfigError, match=message):
        experiment_config_from_dict({"methods": [entry]})


def test_paper_preset_loads():
    """The paper preset: 3 seeds, 15 runs each, three pairs stages and KTO's records; every method with a
    claim, the issue-14 methods included."""
    cfg = load_experiment_config("paper")
    runs = plan_runs(cfg)
    assert cfg.seeds == [0, 1, 2] and len(runs) == 3 * 15 == 3 * sum(len(m.betas) for m in cfg.methods)
    assert {r.pairs_stage for r in runs} == {"pairs", "pairs-all", "pairs-all-n48", None}
    assert {r.data_stage for r in runs} == {"pairs", "pairs-all", "pairs-all-n48", "unpaired", "prompts"}
    methods = {"dpo", "odpo", "ipo", "simpo", "orpo", "kto", "grpo", "ppo", "online_dpo"}
    assert {r.run.method for r in runs} == methods


# ---- pairs subsets ---------------------------------------------------------------------------------------


def test_subsample_pairs_is_a_fixed_subset_in_order():
    rows = list(range(20))
    kept = subsample_pairs(rows, 5, seed=7)
    assert len(kept) == 5 and kept == sorted(kept) and kept == subsample_pairs(rows, 5, seed=7)
    assert subsample_pairs(rows, 5, seed=8) != kept
    assert subsample_pairs(rows, None, seed=7) == rows == subsample_pairs(rows, 20, seed=7)


def test_agreement_standard_error():
    # 32 of 64: p̃ = 33/66 = 0.5, se = sqrt(0.25 / 64) = 0.0625; 3 of 3: p̃ = 0.8, se = sqrt(0.16 / 3) > 0
    assert metrics.proportion_se(32, 64) == pytest.approx(0.0625)
    assert metrics.proportion_se(3, 3) == pytest.approx(math.sqrt(0.16 / 3))
    assert agreement_se({"logp_agreement": 0.5, "heldout_pairs": 64}) == pytest.approx(0.0625)
    assert agreement_se({"reward_mean": 1.0}) is None
    with pytest.raises(ValueError):
        metrics.proportion_se(4, 3)


# ---- aggregation over seeds ------------------------------------------------------------------------------


def _seed_row(run, method, beta, seed, reward, kl, win, agreement):
    return {
        "method": method,
        "beta": beta,
        "reward_mean": reward,
        "reward_se": 0.05,
        "kl_mean": kl,
        "kl_se": 0.2,
        "win_rate": win,
        "logp_agreement": agreement,
        "n_samples": 10,
        "run": run,
        "seed": seed,
        "pairs": None if method == "base" else "all-n48",
    }


def test_aggregate_seeds_mean_and_se_over_seeds():
    rows = [
        _seed_row("base", "base", None, 0, 1.10, 0.0, 0.5, 0.5),
        _seed_row("dpo-all-n48-beta0.1", "dpo", 0.1, 0, 1.2, 1.0, 0.6, 0.5),
        _seed_row("base", "base", None, 1, 1.12, 0.0, 0.5, 0.5),
        _seed_row("dpo-all-n48-beta0.1", "dpo", 0.1, 1, 1.4, 2.0, 0.7, None),
        _seed_row("base", "base", None, 2, 1.14, 0.0, 0.5, 0.5),
        _seed_row("dpo-all-n48-beta0.1", "dpo", 0.1, 2, 1.3, 3.0, 0.8, 0.5),
    ]
    base, dpo = aggregate_seeds(rows)
    # rewards 1.2, 1.4, 1.3: mean 1.3, sample std 0.1, se 0.1/√3 (the per-seed SEs 0.05 are not used)
    assert dpo["reward_mean"] == pytest.approx(1.3) and dpo["reward_se"] == pytest.approx(0.1 / math.sqrt(3))
    # KL 1, 2, 3: mean 2, std 1, se 1/√3; win rates 0.6, 0.7, 0.8: 0.7 ± 0.1/√3
    assert dpo["kl_mean"] == pytest.approx(2.0) and dpo["kl_se"] == pytest.approx(1 / math.sqrt(3))
    assert dpo["win_rate"] == pytest.approx(0.7) and dpo["win_rate_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert dpo["logp_agreement"] is None and dpo["logp_agreement_se"] is None  # one seed had none
    assert (dpo["n_samples"], dpo["n_seeds"], dpo["pairs"], "seed" in dpo) == (30, 3, "all-n48", False)
    assert base["method"] == "base" and base["kl_mean"] == 0.0 and base["kl_se"] == 0.0
    assert base["reward_mean"] == pytest.approx(1.12) and base["reward_se"] == pytest.approx(
        0.02 / math.sqrt(3)
    )


def test_frontier_with_seed_error_bars_and_claims_section(tmp_path):
    rows = aggregate_seeds(
        [_seed_row("base", "base", None, s, 1.1 + 0.01 * s, 0.0, 0.5, 0.5) for s in range(2)]
        + [_seed_row("dpo-b", "dpo", 0.1, s, 1.3 + 0.05 * s, 1.5 + 0.3 * s, 0.6, 0.5) for s in range(2)]
        + [_seed_row("dpo-a", "dpo", 0.5, s, 1.2 + 0.05 * s, 1.0 + 0.2 * s, 0.6, 0.5) for s in range(2)]
    )
    assert plot_frontier(rows, tmp_path / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    md = write_report_md(tmp_path, rows, {"seeds": [0, 1]}, [], sections={"Claims": "- **(c)** held"})
    text = md.read_text()
    assert "## Claims\n\n- **(c)** held" in text and "| dpo [all-n48] | 0.1 |" in text


# ---- end to end ------------------------------------------------------------------------------------------


def test_two_seed_experiment_with_a_pairs_variant(tmp_path, tiny_model_dir):
    methods = [
        {"method": "dpo", "betas": [0.1]},
        {"method": "odpo", "betas": [0.1]},
        {"method": "dpo", "betas": [0.1], "pairs": {"max_pairs": 3}},
    ]
    logs: list[str] = []
    results = run_experiment(_cfg(tmp_path, tiny_model_dir, methods=methods, seeds=[0, 1]), log=logs.append)
    root = tmp_path / "exp"
    names = ["dpo-beta0.1", "odpo-beta0.1", "dpo-n3-beta0.1"]
    for seed in (0, 1):
        assert (root / "eval" / f"base-seed{seed}" / "stage.json").is_file()
        for name in names:
            stage = json.loads((root / "eval" / f"{name}-seed{seed}" / "stage.json").read_text())
            assert stage["inputs"]["seed"] == seed  # the evaluation's sampling seed derives from it
            config = (root / "train" / f"{name}-seed{seed}" / "run" / "config.yaml").read_text()
            assert yaml.safe_load(config)["training"]["seed"] == seed
    base_samples = [(root / "eval" / f"base-seed{s}" / "samples.jsonl").read_text() for s in (0, 1)]
    assert base_samples[0] != base_samples[1]  # seeds differ in the evaluation's samples too
    # the data is shared: one samples stage; the capped pairs are their own stage, with their own reference
    # log-probs in the experiment's cache: computed by the first run on each set of pairs, loaded by the rest
    assert sum(1 for line in open(root / "pairs-n3" / "pairs.jsonl")) == 3
    assert len(list((root / "cache" / "ref_logps").glob("*.safetensors"))) == 2
    computed = [line for line in logs if line.startswith("reference log-probs for")]
    loaded = [line for line in logs if line.startswith("reference log-probs from the cache")]
    assert (
        len(computed) == 2 and len(loaded) == 4 and all(str(root / "cache") in x for x in computed + loaded)
    )
    assert [(r["method"], r.get("pairs"), r["n_seeds"]) for r in results] == [
        ("base", None, 2),
        ("dpo", None, 2),
        ("odpo", None, 2),
        ("dpo", "n3", 2),
    ]
    assert results[3]["n_pairs"] == 3
    by_seed = json.loads((root / "results_by_seed.json").read_text())
    assert len(by_seed) == 8 and {r["seed"] for r in by_seed} == {0, 1}
    rewards = [r["reward_mean"] for r in by_seed if r["run"] == "odpo-beta0.1"]
    assert results[2]["reward_mean"] == pytest.approx(sum(rewards) / 2)
    assert results[2]["reward_se"] == pytest.approx(abs(rewards[0] - rewards[1]) / 2)  # std/√2 of two values
    assert json.loads((root / "results.json").read_text()) == json.loads(json.dumps(results))
    claims = json.loads((root / "claims.json").read_text())
    assert {c["claim"] for c in claims} >= {"b", "c"} and all("verdict" in c for c in claims)
    assert "## Claims" in (root / "report.md").read_text()

    logs.clear()  # a rerun skips everything
    run_experiment(_cfg(tmp_path, tiny_model_dir, methods=methods, seeds=[0, 1]), log=logs.append)
    assert not [line for line in logs if line.startswith("[run]")]


def test_an_explicit_single_seed_reuses_the_seedless_stages(tmp_path, tiny_model_dir):
    """`seeds: [seed]` is the experiment as it was before seeds existed: same names, same fingerprints."""
    methods = [{"method": "simpo", "betas": [2.0]}]
    run_experiment(_cfg(tmp_path, tiny_model_dir, methods=methods), log=lambda *_: None)
    root = tmp_path / "exp"
    assert set(json.loads((root / "pairs" / "stage.json").read_text())["inputs"]) == {
        "samples",
        "mode",
        "format",
        "code",
    }  # an uncapped pairs stage's inputs, as before max_pairs existed
    logs: list[str] = []
    run_experiment(_cfg(tmp_path, tiny_model_dir, methods=methods, seeds=[0]), log=logs.append)
    assert not [line for line in logs if line.startswith("[run]")]
    assert not (root / "results_by_seed.csv").exists()
