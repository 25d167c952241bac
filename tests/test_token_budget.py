"""training.max_tokens_per_batch: a micro-batch's share runs in passes of at most N padded tokens (rows ×
longest row, as the layout pads them), and the step is the same in any cutting: the same weights as without a
limit (DPO with and without prefix sharing, the reward model), 2 gloo processes equal 1, and the memory plan's
activations follow the longest pass."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file
from test_training import make_cfg, metrics, pair_records, quiet, raw_config, weights, write_jsonl

from preftune.config import ConfigError, train_config_from_dict
from preftune.training import loop
from preftune.training.loop import padded_tokens, token_chunks
from preftune.training.memory import ModelShape, activation_bytes
from preftune.training.pairs import pair_rows


def test_passes_by_hand():
    # (rows, row length): a pair without prefix sharing is 2 rows of prompt + the longer response
    rows = [(2, 10), (2, 3), (2, 7), (2, 9), (2, 4)].__getitem__
    # sorted by length: 0 (10), 3 (9), 2 (7), 4 (4), 1 (3); limit 40: [0, 3] = 4 rows × 10 = 40,
    # then 2 + 4: 4 × 7 = 28, + 1: 6 × 7 = 42 > 40, so 1 alone
    assert token_chunks([0, 1, 2, 3, 4], rows, 40) == [[0, 3], [2, 4], [1]]
    assert padded_tokens([2, 4], rows) == 28 and padded_tokens([], rows) == 0
    # a record longer than the limit runs alone; the next starts a new pass
    assert token_chunks([1, 0, 4], rows, 15) == [[0], [4], [1]]
    assert token_chunks([0, 1, 2, 3, 4], rows, 10**6) == [[0, 3, 2, 4, 1]]


def test_passes_respect_the_limit_and_keep_every_record():
    gen = random.Random(0)
    for _ in range(200):
        n = gen.randint(1, 12)
        rows = [(gen.choice([1, 2]), gen.randint(1, 60)) for _ in range(n)].__getitem__
        limit = gen.randint(1, 300)
        share = gen.sample(range(n), gen.randint(1, n))
        chunks = token_chunks(share, rows, limit)
        assert sorted(i for c in chunks for i in c) == sorted(share)
        for k, c in enumerate(chunks):
            assert c and (padded_tokens(c, rows) <= limit or len(c) == 1)
            if k + 1 < len(chunks):  # greedy: the next record would not have fit
                assert padded_tokens(c + chunks[k + 1][:1], rows) > limit
        flat = [rows(i)[1] for c in chunks for i in c]
        assert flat == sorted(flat, reverse=True)


def test_pair_rows_are_what_the_layouts_pad(tiny_tokenizer):
    from preftune.data import PairExample, collate_pairs

    pairs = [PairExample(0, (1, 2, 3), (4, 5), (6,)), PairExample(1, (1,), (4, 5, 6, 7), (8, 9))]
    assert [pair_rows(p, share_prefix=False) for p in pairs] == [(2, 5), (2, 5)]
    assert [pair_rows(p, share_prefix=True) for p in pairs] == [(1, 6), (1, 7)]
    batch = collate_pairs(pairs, 0)
    assert batch["input_ids"].numel() == padded_tokens([0, 1], lambda i: pair_rows(pairs[i], False))


def _spy(monkeypatch) -> list[tuple[list[list[int]], int]]:
    seen: list = []
    original = loop.token_chunks

    def spy(indices, rows, limit):
        chunks = original(indices, rows, limit)
        seen.append(([(padded_tokens(c, rows), len(c)) for c in chunks], limit))
        return chunks

    monkeypatch.setattr(loop, "token_chunks", spy)
    return seen


def _records(n: int) -> list[dict]:  # lengths that differ, so passes hold different numbers of pairs
    return [{**r, "prompt": r["prompt"] + " very" * (i % 5)} for i, r in enumerate(pair_records(n))]


@pytest.mark.parametrize(
    "method, share_prefix, limit",
    [
        ("dpo", True, 60),
        ("dpo", False, 80),
        ("ipo", True, 1),
        ("reward_model", True, 100),
        ("kto", True, 60),
        ("kto", False, 80),
    ],
)
def test_a_step_is_the_same_in_any_cutting(
    tmp_path, tiny_model_dir, monkeypatch, method, share_prefix, limit
):
    data = write_jsonl(tmp_path / "pairs.jsonl", _records(12))
    runs, rows = {}, {}
    for name, tokens in (("whole", None), ("cut", limit)):
        training = {"batch_size": 3, "grad_accum": 2, "max_steps": 2, "share_prefix": share_prefix}
        cfg = make_cfg(tiny_model_dir, data, tmp_path / name, method=method,
                       training={**training, "max_tokens_per_batch": tokens})  # fmt: skip
        seen = _spy(monkeypatch)
        out = train(cfg)
        runs[name] = weights(out / "model")
        rows[name] = metrics(out)
    passes = [t for chunks, _ in seen for t in chunks]
    assert len(passes) > 2 * 2  # more passes than micro-batches: the limit cut them
    assert all(t <= limit or n == 1 for t, n in passes)  # a record over the limit runs alone
    assert any(n > 1 for _, n in passes) or limit == 1
    if limit == 1:  # every record alone
        assert len(passes) == 2 * 2 * 3
    a, b = runs["whole"], runs["cut"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # fp32 summation order, through Adam
    for whole, cut in zip(rows["whole"], rows["cut"], strict=True):  # Adam hides a gradient's scale: the norm
        assert cut["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
        assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-5) and cut["examples"] == whole["examples"]


def train(cfg):
    from preftune.training import train as run

    return run(cfg, log=quiet)


def test_a_record_over_the_limit_runs_alone_with_one_warning(tmp_path, tiny_model_dir, monkeypatch):
    from preftune.training import train as run

    data = write_jsonl(tmp_path / "pairs.jsonl", _records(8))
    lines: list[str] = []
    cfg = make_cfg(
        tiny_model_dir, data, tmp_path / "run", training={"max_tokens_per_batch": 5, "batch_size": 4}
    )
    run(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert sum("longer than training.max_tokens_per_batch" in line for line in lines) == 1


@pytest.mark.parametrize(
    "method, tokens, needle",
    [
        ("dpo", 0, "must be >= 1"),
        ("grpo", 100, "offline methods only"),
    ],
)
def test_the_limit_is_checked(tmp_path, method, tokens, needle):
    raw = raw_config("m", "d.jsonl", tmp_path, method=method, training={"max_tokens_per_batch": tokens})
    if method == "grpo":
        raw["grpo"] = {"rewards": ["length"]}
        raw["data"]["max_length"] = 128
    with pytest.raises(ConfigError, match=needle):
        train_config_from_dict(raw)


def test_the_plan_counts_the_longest_pass(tmp_path, tiny_model_dir, tiny_tokenizer):
    from preftune.training import prepare, validate

    data = write_jsonl(tmp_path / "pairs.jsonl", _records(8))
    shape = ModelShape(
        layers=2, hidden=32, intermediate=64, kv_heads=2, head_dim=8, vocab=len(tiny_tokenizer)
    )

    def raw(tokens, **training):
        return raw_config(tiny_model_dir, data, tmp_path / "run", training={"batch_size": 4,
                          "max_tokens_per_batch": tokens, **training})  # fmt: skip

    def plan(tokens, **training):
        return validate(raw(tokens, **training), log=quiet)["memory_plan"]

    whole = plan(None)
    assert plan(10**6)["activations"] == whole["activations"]  # a limit above the micro-batch changes nothing
    capped = plan(60)
    assert capped["tokens"] == 60 and capped["activations"] == activation_bytes(
        shape, 60, checkpointing=False
    )
    assert capped["activations"] < whole["activations"] and capped["total"] < whole["total"]
    assert capped["response_tokens"] <= 60
    # a limit below every record: each pair runs alone, the longest pair's rows as its layout pads them
    examples = prepare(train_config_from_dict(raw(1)), quiet).examples["train"]
    for share in (True, False):
        longest = max(r * n for r, n in (pair_rows(e, share_prefix=share) for e in examples))
        assert plan(1, share_prefix=share)["tokens"] == longest


CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_processes_equal_one_with_a_token_limit(tmp_path, tiny_model_dir, method):
    # 7 pairs, 2 per rank, accumulation 2: the second micro-batch splits 2 / 1 over the ranks, and the limit
    # cuts the shares into different numbers of passes, so the ranks pad with zero-weight stand-ins (under FSDP a
    # rank that ran fewer forward passes would leave the other waiting in an all-gather). DPO: 2 processes with
    # the limit equal 1 process with the doubled batch and the limit. KTO: each rank's z0 pairs its own share's
    # records (2 ranks never equal 1), so 2 processes with the limit equal 2 processes without it (z0 over the
    # micro-batch of both ranks, before the passes)
    data = write_jsonl(tmp_path / "pairs.jsonl", _records(7))
    paths = {}
    other = ("one", 4, "none", 30) if method == "dpo" else ("one", 2, "fsdp", None)
    for name, batch, sharding, tokens in (("two", 2, "fsdp", 30), other):
        training = {
            "batch_size": batch,
            "grad_accum": 2,
            "max_tokens_per_batch": tokens,
            "sharding": sharding,
        }
        raw = raw_config(tiny_model_dir, data, tmp_path / name, method=method, training=training)
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw))
    env = {**os.environ, **CPU_ENV}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    for name, processes in (("two", 2), ("one", 2 if method == "kto" else 1)):
        command = [*launch] if processes == 2 else [sys.executable, "-m", "preftune.cli"]
        done = subprocess.run(
            [*command, "train", str(paths[name])], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("two", "one")]  # fmt: skip
    for r2, r1 in zip(*rows, strict=True):
        assert r2["examples"] == r1["examples"] and r2["loss"] == pytest.approx(r1["loss"], abs=1e-6)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)
