"""The trainer end to end on the tiny random Llama: known step-1 losses, saved models, equivalences
(batch × accumulation, resume, precomputed reference), every method, LoRA, and errors before training."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import preftune
import preftune.training.run as run_module
from preftune.cli import main
from preftune.config import train_config_from_dict
from preftune.data import DataError, prompt_ids, response_ids
from preftune.training import RunDirError, train

LN2 = math.log(2.0)
STANDARD_KEYS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "lr",
    "grad_norm",
    "tokens_per_s",
}
GOOD = ["great and wonderful", "a wonderful story", "great music and a great ending", "I loved it"]
BAD = ["terrible and boring", "far too long", "a waste of time", "the plot made no sense"]


def quiet(*args, **kwargs) -> None:
    pass


def pair_records(n: int, *, score_chosen: float = 2.5, score_rejected: float = 0.5) -> list[dict]:
    return [
        {
            "prompt": f"Review {i}: the movie was",
            "chosen": f" {GOOD[i % len(GOOD)]}.",
            "rejected": f" {BAD[(i * 3) % len(BAD)]}{'!' * (i % 3)}",
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def raw_config(model_dir, train_file, out_dir, **sections) -> dict:
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file), "max_length": 64, "max_prompt_length": 32},
        "training": {
            "output_dir": str(out_dir),
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "progress": False,
        },
    }
    return merge(base, sections)


def make_cfg(model_dir, train_file, out_dir, **sections):
    return train_config_from_dict(raw_config(model_dir, train_file, out_dir, **sections))


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def max_change(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def file_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def hand_logps(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(float(logp[len(prompt) + k - 1, tok]) for k, tok in enumerate(response))


@pytest.fixture
def data8(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))


# --- end to end through the CLI ------------------------------------------------------------------------


def test_dpo_end_to_end_via_cli(tmp_path, tiny_model_dir, tiny_tokenizer, data8, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    start_digest = file_digest(tiny_model_dir)
    start_weights = weights(tiny_model_dir)
    out = tmp_path / "run"
    config_path = tmp_path / "dpo.yaml"
    raw = raw_config(tiny_model_dir, data8, tmp_path / "elsewhere", training={"max_steps": 3})
    config_path.write_text(yaml.safe_dump(raw))

    saved = {}
    original_save = run_module.save_model

    def capture(model, tokenizer, out_dir, **kw):  # keep the in-memory policy that train() saves
        saved.setdefault(Path(out_dir).name, model)
        return original_save(model, tokenizer, out_dir, **kw)

    monkeypatch.setattr(run_module, "save_model", capture)
    assert main(["train", str(config_path), f"training.output_dir={out}", "dpo.beta=0.1"]) == 0
    assert f"done: {out}" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists()  # the override won

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["loss"] - LN2) < 1e-5  # policy == reference, dropout off
    # rewards are ~0 (the reference was computed in other batches, so padding differs: float noise only)
    assert abs(rows[0]["rewards/chosen"]) < 1e-5 and abs(rows[0]["rewards/margins"]) < 1e-5
    for row in rows:
        assert STANDARD_KEYS <= row.keys()
        assert all(math.isfinite(row[k]) for k in STANDARD_KEYS)
        assert row["examples"] == 2 and row["tokens_per_s"] > 0
    assert rows[1]["loss"] != rows[0]["loss"]
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(1e-3 * 2 / 3)

    # the starting folder is untouched; the trained policy differs from it
    assert file_digest(tiny_model_dir) == start_digest
    final = weights(out / "model")
    assert max_change(final, start_weights) > 1e-4

    # the cached reference log-probs are those of the starting model, in data order
    ref = load_file(out / "ref_logps.safetensors")["train"]
    start_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = torch.tensor(
        [
            [
                hand_logps(
                    start_model, prompt_ids(tiny_tokenizer, r["prompt"]), response_ids(tiny_tokenizer, r[k])
                )
                for k in ("chosen", "rejected")
            ]
            for r in pair_records(8)
        ]
    )
    assert ref.shape == (8, 2)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-4)

    # the saved folder reloads with plain transformers and gives the in-memory policy's logits exactly
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    policy = saved["model"].eval()
    ids = torch.tensor([prompt_ids(tiny_tokenizer, "The movie was great and the acting was wonderful.")])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits)
    again = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, reloaded(input_ids=ids).logits)

    # run files
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["output_dir"] == str(out)
    result = json.loads((out / "result.json").read_text())
    assert result["optimizer_steps"] == 3 and result["train_pairs"] == 8
    assert result["final_train_metrics"]["step"] == 3
    assert (out / "model" / "tokenizer_config.json").is_file()
    assert not (out / "checkpoints").exists()


def test_batch_times_accumulation_is_invariant(tmp_path, tiny_model_dir, data8):
    a = train(
        make_cfg(tiny_model_dir, data8, tmp_path / "a", training={"batch_size": 4, "grad_accum": 1}),
        log=quiet,
    )
    b = train(
        make_cfg(tiny_model_dir, data8, tmp_path / "b", training={"batch_size": 1, "grad_accum": 4}),
        log=quiet,
    )
    wa, wb = weights(a / "model"), weights(b / "model")
    assert max_change(wa, weights(tiny_model_dir)) > 1e-4
    assert_weights_close(wa, wb, atol=1e-5)
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        assert ra["examples"] == rb["examples"] == 4
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5)


RESUME_VARIANTS = {
    "full": {},
    # 2 steps per epoch: the resumed half is the second epoch; the reference is a frozen copy
    "accum-ref-on-the-fly": {"training": {"grad_accum": 2, "precompute_ref": False}},
    "lora": {
        "model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "training": {"learning_rate": 1e-2},
    },
}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data8, variant):
    sections = merge({"training": {"max_steps": 4, "save_every": 2}}, RESUME_VARIANTS[variant])
    weights_file = "adapter_model.safetensors" if variant == "lora" else "model.safetensors"
    run_a = train(make_cfg(tiny_model_dir, data8, tmp_path / "a", **sections), log=quiet)

    cfg_b = make_cfg(tiny_model_dir, data8, tmp_path / "b", **sections)

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, on_step_end=interrupt, log=quiet)
    run_b = tmp_path / "b"
    ckpt = run_b / "checkpoints" / "step-0000002"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model" / weights_file).is_file()
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert not (run_b / "model").exists()
    assert [r["step"] for r in metrics(run_b)] == [1, 2]

    seen = []
    train(cfg_b, resume=True, on_step_end=lambda step, row: seen.append(step), log=quiet)
    assert seen == [3, 4]
    wa, wb = (load_file(run / "model" / weights_file) for run in (run_a, run_b))
    assert max_change(wa, load_file(ckpt / "model" / weights_file)) > 1e-5  # steps 3-4 did something
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows_a, rows_b = metrics(run_a), metrics(run_b)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ra.pop("tokens_per_s"), rb.pop("tokens_per_s")
        assert ra == rb


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir, data8):
    sections = {"training": {"max_steps": 4, "save_every": 2}}
    cfg = make_cfg(tiny_model_dir, data8, tmp_path / "r", **sections)

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=interrupt, log=quiet)
    changed = make_cfg(
        tiny_model_dir, data8, tmp_path / "r", training={"max_steps": 6, "save_every": 2, "batch_size": 1}
    )
    with pytest.raises(RunDirError, match="training.batch_size"):
        train(changed, resume=True, log=quiet)
    other = make_cfg(
        tiny_model_dir, data8, tmp_path / "r", training={"max_steps": 4, "save_every": 2, "seed": 3}
    )
    with pytest.raises(RunDirError) as exc:  # not a schedule key: no remark about the learning rate
        train(other, resume=True, log=quiet)
    assert "--allow-change training.seed" in str(exc.value) and "learning-rate" not in str(exc.value)
    longer = make_cfg(tiny_model_dir, data8, tmp_path / "r", training={"max_steps": 6, "save_every": 2})
    # a longer run changes the learning rate of every remaining step (linear decay): refused unless asked
    with pytest.raises(
        RunDirError, match=r"training.max_steps \(4 -> 6\).*--allow-change training.max_steps"
    ):
        train(longer, resume=True, log=quiet)
    train(longer, resume=True, allow_changes=["training.max_steps"], log=quiet)
    assert [r["step"] for r in metrics(tmp_path / "r")][-1] == 6


def test_resume_without_checkpoint_and_existing_run_dir(tmp_path, tiny_model_dir, data8, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, data8, out, training={"max_steps": 1})
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        train(cfg, resume=True, log=quiet)
    out.mkdir()  # an empty folder is fine
    train(cfg, log=quiet)
    first = weights(out / "model")
    with pytest.raises(RunDirError, match="already exists.*--resume.*--overwrite"):
        train(cfg, log=quiet)
    (out / "marker").write_text("old run")
    train(cfg, overwrite=True, log=quiet)
    assert not (out / "marker").exists()
    assert_weights_close(weights(out / "model"), first, atol=0)  # same seed, same run

    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(tiny_model_dir, data8, out, training={"max_steps": 1})))
    assert main(["train", str(config_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", str(config_path), "--overwrite"]) == 0


# --- every method --------------------------------------------------------------------------------------


METHODS = [
    ("dpo", {}, LN2),
    ("dpo", {"dpo": {"label_smoothing": 0.1}}, LN2),
    ("ipo", {"ipo": {"beta": 0.1}}, 25.0),  # (0 - 1/(2*0.1))^2
    ("hinge", {}, 1.0),  # max(0, 1 - 0)
    ("rpo", {}, None),
    ("odpo", {"odpo": {"offset": "log", "alpha": 1.0}}, math.log(3.0)),  # softplus(log(2.5 - 0.5))
    ("odpo", {"odpo": {"offset": "identity", "alpha": 0.5}}, math.log1p(math.e)),  # softplus(0.5 * 2)
    ("simpo", {}, None),
]


@pytest.mark.parametrize("method, sections, step1_loss", METHODS, ids=lambda v: str(v)[:30])
def test_each_pair_method_trains(
    tmp_path, tiny_model_dir, tiny_tokenizer, data8, method, sections, step1_loss
):
    out = train(make_cfg(tiny_model_dir, data8, tmp_path / "run", method=method, **sections), log=quiet)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert STANDARD_KEYS <= row.keys()
        assert all(math.isfinite(row[k]) for k in STANDARD_KEYS)
    if step1_loss is not None:
        assert rows[0]["loss"] == pytest.approx(step1_loss, abs=1e-5)
    if method == "rpo":  # DPO term ln 2 plus α × the per-token NLL of the chosen response (α = 1), batch mean
        from transformers import AutoModelForCausalLM

        from preftune.training.loop import StepPlan

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        _, (first,) = StepPlan(8, 2, 1, 0).step(0)  # step 1's pairs (examples are the file's lines)
        records = pair_records(8)
        nll = []
        for i in first:
            chosen = response_ids(tiny_tokenizer, records[i]["chosen"])
            p = prompt_ids(tiny_tokenizer, records[i]["prompt"])
            nll.append(-hand_logps(base, p, chosen) / len(chosen))
        assert rows[0]["loss"] == pytest.approx(LN2 + sum(nll) / len(nll), abs=1e-4)
        assert abs(rows[0]["rewards/margins"]) < 1e-5
    if method == "simpo":  # reference-free: no reference log-probs, rewards are beta * mean token log-prob
        assert not (out / "ref_logps.safetensors").exists()
        assert rows[0]["rewards/chosen"] < 0 and rows[0]["loss"] > 0
    else:
        assert load_file(out / "ref_logps.safetensors")["train"].shape == (8, 2)
    assert max_change(weights(out / "model"), weights(tiny_model_dir)) > 1e-4


def test_reward_model_trains_and_loads_as_sequence_classifier(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "easy.jsonl", pair_records(16))
    out = train(
        make_cfg(
            tiny_model_dir,
            data,
            tmp_path / "rm",
            method="reward_model",
            data={"eval": str(data)},
            training={"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3},
        ),
        log=quiet,
    )
    assert not (out / "ref_logps.safetensors").exists()
    rows = metrics(out)
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows)
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= rows[
        0
    ].keys()
    evals = metrics(out, "eval")
    assert len(evals) == 1 and evals[0]["step"] == 12
    assert evals[0]["rewards/accuracies"] >= 0.9  # an easy dataset: chosen scores above rejected
    assert rows[-1]["loss"] < rows[0]["loss"]

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tiny_tokenizer.pad_token_id
    ids = [
        prompt_ids(tiny_tokenizer, "Review 3: the movie was") + tiny_tokenizer(t)["input_ids"]
        for t in GOOD[:1]
    ]
    with torch.no_grad():
        scores = model(input_ids=torch.tensor(ids)).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
    # the reward model scores the pairs it was trained on in the right order
    chosen, rejected = [], []
    with torch.no_grad():
        for r in pair_records(16):
            p = prompt_ids(tiny_tokenizer, r["prompt"])
            for text, into in ((r["chosen"], chosen), (r["rejected"], rejected)):
                ids = torch.tensor([p + tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
                into.append(float(model(input_ids=ids).logits))
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 14


# --- LoRA and the reference ----------------------------------------------------------------------------


def test_lora_dpo_reference_is_adapters_off_and_merge(tmp_path, tiny_model_dir, tiny_tokenizer, data8):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {
        "enabled": True,
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "up_proj"],
        "merge": True,
    }
    out = train(
        make_cfg(
            tiny_model_dir, data8, tmp_path / "lora", model={"lora": lora}, training={"learning_rate": 1e-2}
        ),
        log=quiet,
    )
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(rows[1]["rewards/margins"]) > 1e-4  # the adapters moved the policy off the reference
    adapter = out / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    merged = AutoModelForCausalLM.from_pretrained(out / "model_merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    ).eval()
    ids = torch.tensor([prompt_ids(tiny_tokenizer, "Review 1: the movie was great and wonderful.")])
    with torch.no_grad():
        lm = merged(input_ids=ids).logits
        torch.testing.assert_close(lm, with_adapter(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert (lm - base(input_ids=ids).logits).abs().max() > 1e-4
    assert not any("lora" in k for k in weights(out / "model_merged"))
    # the reference cache holds the base model's log-probs (adapters off = the starting model)
    ref = load_file(out / "ref_logps.safetensors")["train"]
    r0 = pair_records(8)[0]
    expected = hand_logps(
        base, prompt_ids(tiny_tokenizer, r0["prompt"]), response_ids(tiny_tokenizer, r0["chosen"])
    )
    assert float(ref[0, 0]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_on_the_fly_equals_precomputed(tmp_path, tiny_model_dir, data8, lora):
    sections = (
        {"model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}} if lora else {}
    )
    runs = {}
    for precompute in (True, False):
        runs[precompute] = train(
            make_cfg(
                tiny_model_dir,
                data8,
                tmp_path / f"pre{precompute}",
                training={"precompute_ref": precompute, "learning_rate": 1e-2 if lora else 1e-3},
                **sections,
            ),
            log=quiet,
        )
    assert not (runs[False] / "ref_logps.safetensors").exists()
    pre, fly = metrics(runs[True]), metrics(runs[False])
    assert pre[0]["loss"] == pytest.approx(LN2, abs=1e-5) and fly[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    for a, b in zip(pre, fly, strict=True):
        for k in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert a[k] == pytest.approx(b[k], abs=1e-5)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    wa, wb = (load_file(runs[p] / "model" / name) for p in (True, False))
    assert_weights_close(wa, wb, atol=1e-5)


def test_eval_split_is_evaluated(tmp_path, tiny_model_dir, data8):
    out = train(
        make_cfg(
            tiny_model_dir,
            data8,
            tmp_path / "ev",
            data={"eval_fraction": 0.25},
            training={"max_steps": 3, "eval_every": 2, "eval_batch_size": 1},
        ),
        log=quiet,
    )
    evals = metrics(out, "eval")
    assert [r["step"] for r in evals] == [2, 3]
    assert {"loss", "rewards/margins", "logps/chosen"} <= evals[0].keys()
    ref = load_file(out / "ref_logps.safetensors")
    assert ref["train"].shape == (6, 2) and ref["eval"].shape == (2, 2)
    assert json.loads((out / "result.json").read_text())["eval_pairs"] == 2


# --- bad input fails before training -------------------------------------------------------------------


def test_missing_field_fails_before_training(tmp_path, tiny_model_dir, capsys):
    records = pair_records(5)
    del records[2]["chosen"]  # line 3
    data = write_jsonl(tmp_path / "broken.jsonl", records)
    out = tmp_path / "run"
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(tiny_model_dir, data, out)))
    assert main(["train", str(config_path)]) != 0
    err = capsys.readouterr().err
    assert f"{data} line 3: field 'chosen': missing" in err
    assert not (out / "model").exists() and not out.exists()


def test_odpo_tie_under_log_offset_names_the_record(tmp_path, tiny_model_dir, capsys):
    records = pair_records(6)
    records[3]["score_rejected"] = records[3]["score_chosen"]  # a tie on line 4
    data = write_jsonl(tmp_path / "tie.jsonl", records)
    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, data, out, method="odpo")
    with pytest.raises(DataError, match=f"ODPO offset 'log' undefined for {data} line 4"):
        train(cfg, log=quiet)
    assert not out.exists()
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(tiny_model_dir, data, out, method="odpo")))
    assert main(["train", str(config_path)]) == 2
    assert f"{data} line 4" in capsys.readouterr().err
    # the identity offset accepts a tie
    assert main(["train", str(config_path), "odpo.offset=identity", "training.max_steps=1"]) == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_odpo_without_scores_fails_before_training(tmp_path, tiny_model_dir):
    records = [{k: v for k, v in r.items() if not k.startswith("score")} for r in pair_records(3)]
    data = write_jsonl(tmp_path / "noscores.jsonl", records)
    with pytest.raises(
        DataError, match=r"line 1: field 'score_chosen': missing \(this method needs scores\)"
    ):
        train(make_cfg(tiny_model_dir, data, tmp_path / "run", method="odpo"), log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant", ["full", "lora", "on_the_fly"])
def test_shared_prefix_training_equals_the_plain_path(tmp_path, tiny_model_dir, data8, variant):
    """Chosen and rejected share their prompt's encoding: the same steps as the plain (2B, T) batch."""
    extra = {
        "full": {},
        "lora": {"model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}},
        "on_the_fly": {"training": {"precompute_ref": False}},
    }[variant]
    runs = {}
    for share in (True, False):
        sections = merge({"training": {"max_steps": 3, "share_prefix": share}}, extra)
        runs[share] = train(make_cfg(tiny_model_dir, data8, tmp_path / f"s{share}", **sections), log=quiet)
    name = "adapter_model.safetensors" if variant == "lora" else "model.safetensors"
    a, b = (load_file(runs[s] / "model" / name) for s in (True, False))
    assert_weights_close(a, b, atol=2e-5)
    for ra, rb in zip(metrics(runs[True]), metrics(runs[False]), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    assert metrics(runs[True])[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_reference_log_probs_are_cached_across_runs(tmp_path, tiny_model_dir, data8, monkeypatch, capsys):
    import preftune.training.run as run_mod

    monkeypatch.setenv("PREFTUNE_REF_CACHE", str(tmp_path / "ref-cache"))  # empty: no other test's entries
    calls = []
    real = run_mod.pair_reference_logps
    monkeypatch.setattr(run_mod, "pair_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs: list[str] = []
    first = train(make_cfg(tiny_model_dir, data8, tmp_path / "a"), log=logs.append)
    assert len(calls) == 1
    second = train(make_cfg(tiny_model_dir, data8, tmp_path / "b"), log=logs.append)
    assert len(calls) == 1 and any("from the cache" in line for line in logs)  # the second run computed none
    assert_weights_close(weights(first / "model"), weights(second / "model"), atol=0)
    cfg = make_cfg(tiny_model_dir, data8, tmp_path / "c", training={"ref_cache": False})  # --no-ref-cache
    train(cfg, log=quiet)
    assert len(calls) == 2
    other = write_jsonl(tmp_path / "other.jsonl", pair_records(6))  # other data: another key
    train(make_cfg(tiny_model_dir, other, tmp_path / "d"), log=quiet)
    assert len(calls) == 3
    assert (
        main(
            ["train", str(_yaml(tmp_path, make_cfg(tiny_model_dir, data8, tmp_path / "e"))), "--no-ref-cache"]
        )
        == 0
    )
    assert len(calls) == 4


def _yaml(tmp_path, cfg):
    path = tmp_path / f"{Path(cfg.training.output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_takes_the_same_steps(tmp_path, tiny_model_dir, data8, lora):
    extra = (
        {"model": {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}} if lora else {}
    )
    runs = {}
    for ckpt in (False, True):
        sections = merge({"training": {"max_steps": 2, "gradient_checkpointing": ckpt}}, extra)
        runs[ckpt] = train(make_cfg(tiny_model_dir, data8, tmp_path / f"g{ckpt}", **sections), log=quiet)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(runs[c] / "model" / name) for c in (False, True))
    assert_weights_close(a, b, atol=1e-5)
    assert metrics(runs[True])[1]["loss"] == pytest.approx(metrics(runs[False])[1]["loss"], abs=1e-6)


def test_group_by_length_sorts_windows_and_pads_less(tmp_path, tiny_model_dir):
    from preftune.training.loop import StepPlan

    lengths = [3, 50, 7, 42, 5, 30, 9, 61, 2, 44, 8, 37]
    plan = StepPlan(12, 2, 1, seed=0, lengths=lengths)
    micro = [m for s in range(plan.steps_per_epoch) for m in plan.step(s)[1]]
    assert sorted(i for m in micro for i in m) == list(range(12))  # every example, once
    flat = [lengths[i] for m in micro for i in m]
    assert flat == sorted(flat, reverse=True)  # one window here: longest first
    assert micro == [
        m for s in range(plan.steps_per_epoch) for m in StepPlan(12, 2, 1, 0, lengths=lengths).step(s)[1]
    ]
    rows = [
        {"prompt": f"Review {i}: the movie was", "chosen": " great" * (1 + 6 * (i % 2)), "rejected": " bad" * (1 + 5 * (i % 2))}
        for i in range(16)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    shares = {}
    for grouped in (False, True):
        sections = {
            "training": {"max_steps": 4, "batch_size": 4, "group_by_length": grouped, "learning_rate": 1e-4}
        }
        run = train(make_cfg(tiny_model_dir, data, tmp_path / f"l{grouped}", **sections), log=quiet)
        shares[grouped] = sum(r["padding_share"] for r in metrics(run)) / 4
    assert shares[True] < shares[False]


def test_a_reward_models_margin_rule_is_per_split(tmp_path, tiny_model_dir):
    """Margins on every training pair and none in a separate eval file: valid (all rows of a split or none, as
    a stream decides it); a margin on some training rows only is refused by line, in the same one message as
    the other splits' problems."""
    train_rows = [{**r, "margin": 1.0} for r in pair_records(6)]
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", pair_records(4))
    cfg = make_cfg(
        tiny_model_dir, train_file, tmp_path / "run", method="reward_model", data={"eval": str(eval_file)}
    )
    assert preftune.validate(cfg, load_weights=False, log=quiet)["eval_pairs"] == 4
    del train_rows[2]["margin"]
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    with pytest.raises(
        DataError, match=r"1 problem\(s\) in 10 row\(s\):\n  .*train.jsonl line 3: field 'margin'"
    ):
        preftune.validate(cfg, load_weights=False, log=quiet)
