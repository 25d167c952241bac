"""The ``preftune`` command line: help, show-config, validate (which writes nothing), errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from preftune.cli import build_parser, main


def write_data(tmp_path, n: int = 6):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Review {i}: the movie was", "chosen": " great.", "rejected": f" boring{'!' * i}"}
            )
            + "\n"
            for i in range(n)
        )
    )
    return path


@pytest.fixture
def config_path(tmp_path, tiny_model_dir):
    path = tmp_path / "cfg.yaml"
    raw = {
        "method": "dpo",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(write_data(tmp_path)), "max_length": 64, "max_prompt_length": 32},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "grad_accum": 2, "epochs": 3},
        "dpo": {"beta": 0.1},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "validate", "show-config", "experiment", "generate", "export"):
        assert command in out
    assert set(build_parser()._subparsers._group_actions[0].choices) == {
        "train",
        "validate",
        "show-config",
        "experiment",
        "generate",
        "export",
    }


def test_console_script_help():
    """The installed entry point (``python -m preftune.cli`` is the same function)."""
    done = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "show-config" in done.stdout and "experiment" in done.stdout


def test_subcommand_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--overwrite" in out and "dotted.key=value" in out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["fly"])
    assert info.value.code == 2


def test_show_config_prints_resolved_yaml_with_overrides(config_path, capsys):
    assert (
        main(
            [
                "show-config",
                str(config_path),
                "dpo.beta=0.5",
                "training.max_steps=3",
                "training.learning_rate=5e-6",
            ]
        )
        == 0
    )
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] == "dpo"
    assert shown["dpo"] == {"beta": 0.5, "label_smoothing": 0.0}
    assert shown["training"]["max_steps"] == 3 and shown["training"]["learning_rate"] == 5e-6
    assert shown["training"]["grad_accum"] == 2  # from the file
    assert shown["training"]["warmup_steps"] == 0  # a default, resolved
    assert shown["model"]["lora"]["enabled"] is False
    for other in ("ipo", "simpo", "reward_model", "grpo", "generation"):
        assert other not in shown  # sections the method does not use are not shown


def test_show_config_errors_exit_2(config_path, tmp_path, capsys):
    assert main(["show-config", str(config_path), "training.bogus=1"]) == 2
    assert "'bogus'" in capsys.readouterr().err
    assert main(["show-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["show-config", str(config_path), "simpo.beta=2"]) == 2
    assert "method is 'dpo'" in capsys.readouterr().err


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("no_model", [True, False], ids=["no-model", "with-model"])
def test_validate_prints_summary_and_writes_nothing(config_path, tmp_path, tiny_model_dir, capsys, no_model):
    before, model_before = _files(tmp_path), _files(tiny_model_dir)
    argv = ["validate", str(config_path)] + (["--no-model"] if no_model else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    ending = "ok: config and data are valid" + (" (model not loaded)" if no_model else "; model loaded")
    assert out.rstrip().endswith(ending)
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["method"] == "dpo" and summary["train_pairs"] == 6 and summary["eval_pairs"] == 0
    # 6 pairs / batch 2 = 3 micro-batches per epoch; 2 per step -> 2 steps per epoch; 3 epochs
    assert summary["steps_per_epoch"] == 2 and summary["optimizer_steps"] == 6
    assert summary["pairs_per_step"] == 4
    assert summary["tokenize"]["train"]["kept"] == 6
    if no_model:
        assert "parameters" not in summary
    else:
        assert summary["parameters"] == summary["trainable_parameters"] > 0
        assert summary["reference"] == "precomputed"  # no copy: the policy before its first step
    assert _files(tmp_path) == before and _files(tiny_model_dir) == model_before
    assert not (tmp_path / "run").exists()


def test_validate_max_steps_and_lora(config_path, capsys):
    argv = ["validate", str(config_path), "training.max_steps=5", "model.lora.enabled=true", "model.lora.r=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["optimizer_steps"] == 5 and summary["lora"] is True
    assert summary["reference"] == "adapters disabled"
    assert 0 < summary["trainable_parameters"] < summary["parameters"]


def test_validate_reports_bad_data(config_path, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})
    data.write_text("\n".join(lines) + "\n")
    assert main(["validate", str(config_path), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 2: field 'chosen': empty text" in err


def test_overrides_after_an_option(config_path, capsys):
    assert main(["validate", str(config_path), "--no-model", "training.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["optimizer_steps"] == 5


def test_missing_model_is_a_clean_error(config_path, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["validate", str(config_path), f"model.name_or_path={missing}", "--no-model"]) == 2
    assert "error:" in capsys.readouterr().err


def test_generate_from_a_lora_run_directory_with_a_reward(tmp_path, tiny_model_dir, capsys):
    """`preftune generate RUN_DIR` loads a LoRA adapter onto its base, samples, scores and writes JSONL."""
    import json as _json

    import preftune

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            _json.dumps({"prompt": f"The movie {i} was", "chosen": " great", "rejected": " bad"}) + "\n"
            for i in range(4)
        )
    )
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    run = preftune.train(
        {
            "model": {"name_or_path": str(tiny_model_dir), "lora": lora},
            "data": {"train": str(pairs), "max_length": 32, "max_prompt_length": 16},
            "training": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 1,
                "batch_size": 2,
                "progress": False,
            },
        },
        log=lambda *a: None,
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\n# a comment\nI loved the story\n")
    out = tmp_path / "samples.jsonl"
    argv = ["generate", str(run), "--prompts", str(prompts), "-n", "2", "--max-new-tokens", "5"]
    assert main(argv + ["--reward", "vader", "--out", str(out), "--prompt", "Hello world."]) == 0
    rows = [_json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The movie was"] * 2 + ["I loved the story"] * 2 + [
        "Hello world."
    ] * 2
    assert all(1 <= r["tokens"] <= 5 and r["rewards"]["vader"] == r["reward"] for r in rows)
    text = capsys.readouterr().out
    assert "### The movie was" in text and "mean reward" in text
    assert main(["generate", str(tiny_model_dir)]) == 2  # no prompts: a clear error
    assert "no prompts" in capsys.readouterr().err


def test_generate_and_train_refuse_meaningless_flags_before_loading_anything(config_path, capsys):
    """``generate -n 0`` / ``--limit 0`` name the flag (no model is loaded), and ``--allow-change`` without
    ``--resume`` is an error, not silently ignored."""
    for flags, name in ((["-n", "0"], "-n/--num-samples"), (["--limit", "0"], "--limit")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "no-such-model", "--prompt", "hi", *flags])
        assert exc.value.code == 2 and f"{name} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", str(config_path), "--allow-change", "training.max_steps"])
    assert exc.value.code == 2 and "--allow-change only applies with --resume" in capsys.readouterr().err


def test_export_of_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
