"""data.token_cache: a second preparation of the same data maps the first one's tokenised examples, equal to
tokenising again (examples and stats), without reading the file; the key follows the file's content, the
length settings and the tokenizer; a partial entry is ignored and rewritten; ``data.token_cache: false`` writes
nothing."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from test_kto import unpaired_records
from test_training import pair_records, quiet, raw_config, write_jsonl

from preftune.config import train_config_from_dict
from preftune.data import token_cache
from preftune.training.prepare import prepare

prepare_module = importlib.import_module("preftune.training.prepare")  # the module, not the function


def _records(n: int) -> list[dict]:
    rows = pair_records(n)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}  # dropped: chosen and rejected the same tokens
    rows[5] = {**rows[5], "prompt": "very " * 40 + rows[5]["prompt"]}  # prompt truncated
    rows[6] = {**rows[6], "chosen": " great" * 60}  # response truncated
    return rows


def _cfg(model_dir, data_file, tmp_path, **sections):
    return train_config_from_dict(raw_config(model_dir, data_file, tmp_path / "run", **sections))


def _no_reading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the data was read and tokenised again")

    monkeypatch.setattr(prepare_module, "_read_and_tokenize", fail)


def _entries() -> list:
    root = token_cache.cache_root()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


@pytest.mark.parametrize(
    "method, sections",
    [
        ("odpo", {"data": {"eval_fraction": 0.25}}),  # scores, a split by prompt, dropped and truncated pairs
        ("reward_model", {}),
        ("kto", {}),  # unpaired records
    ],
)
def test_a_hit_equals_a_miss(tmp_path, tiny_model_dir, monkeypatch, method, sections):
    rows = unpaired_records(8) if method == "kto" else _records(12)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = _cfg(tiny_model_dir, data, tmp_path, method=method, **sections)
    lines_miss: list[str] = []
    miss = prepare(cfg, lines_miss.append)
    assert len(_entries()) == 1
    _no_reading(monkeypatch)
    lines_hit: list[str] = []
    hit = prepare(cfg, lines_hit.append)
    assert hit.examples.keys() == miss.examples.keys()
    for split in miss.examples:
        assert isinstance(hit.examples[split], token_cache.CachedExamples) or method == "kto"
        assert list(hit.examples[split]) == list(miss.examples[split])
        assert vars(hit.stats[split]) == vars(miss.stats[split])
    assert lines_hit == lines_miss  # the dropped pairs are named again
    if method == "odpo":
        stats = vars(miss.stats["train"])
        assert stats["dropped_identical"] == 1 and stats["prompt_truncated"] >= 1 and stats["dropped"]
        assert hit.summary() == miss.summary()


def test_the_cached_examples_are_a_sequence(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records(8))
    cfg = _cfg(tiny_model_dir, data, tmp_path)
    miss = list(prepare(cfg, quiet).examples["train"])
    hit = prepare(cfg, quiet).examples["train"]
    assert len(hit) == len(miss) == 7
    assert hit[-1] == miss[-1] and hit[1:4] == miss[1:4] and hit == miss
    assert [e.index for e in hit] == list(range(7)) and isinstance(hit[0].prompt_ids, tuple)
    with pytest.raises(IndexError):
        hit[7]


def test_the_key_follows_the_data_the_lengths_and_the_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    from conftest import build_tiny_tokenizer

    data = write_jsonl(tmp_path / "data.jsonl", _records(8))

    def key(tokenizer=tiny_tokenizer, **data_section):
        cfg = _cfg(tiny_model_dir, data, tmp_path, data=data_section)
        return prepare_module._token_cache_key(cfg, tokenizer)

    base = key()
    assert key() == base
    assert key(max_length=48) != base and key(max_prompt_length=16) != base
    assert key(columns={"prompt": "question"}) != base
    assert key(tokenizer=build_tiny_tokenizer(add_bos=True)) != base
    templated = build_tiny_tokenizer()
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert key(tokenizer=templated) != base
    rows = _records(8)
    rows[2]["chosen"] = rows[2]["chosen"] + "!"  # one character of the file
    write_jsonl(data, rows)
    assert key() != base
    assert key(eval_fraction=0.5) != key()


def test_a_partial_entry_is_ignored_and_rewritten(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records(8))
    cfg = _cfg(tiny_model_dir, data, tmp_path)
    miss = list(prepare(cfg, quiet).examples["train"])
    (entry,) = _entries()
    folder = token_cache.cache_root() / entry
    tokens = np.load(folder / "train.tokens.npy")
    np.save(folder / "train.tokens.npy", tokens[:-3])  # a whole .npy, but fewer tokens than the offsets
    assert token_cache.load(entry) is None
    assert list(prepare(cfg, quiet).examples["train"]) == miss  # read again and rewritten
    assert token_cache.load(entry) is not None
    (folder / "train.offsets.npy").write_bytes(b"\x93NUMPY")  # cut short
    assert token_cache.load(entry) is None
    meta = json.loads((folder / "meta.json").read_text())
    assert list(prepare(cfg, quiet).examples["train"]) == miss
    meta["splits"]["train"]["records"]["source"].pop()  # the records disagree with the count
    (folder / "meta.json").write_text(json.dumps(meta))
    assert token_cache.load(entry) is None


def test_the_cache_can_be_switched_off(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records(8))
    prepare(_cfg(tiny_model_dir, data, tmp_path, data={"token_cache": False}), quiet)
    assert _entries() == []


def test_a_hub_id_is_not_cached():
    assert token_cache.content_digest("someone/some-dataset") is None
    assert token_cache.cache_key({"train": "someone/some-dataset"}, None, {}) is None


def test_large_files_are_sampled(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 100_000)
    whole = token_cache.content_digest(path)
    monkeypatch.setattr(token_cache, "WHOLE_BELOW", 1000)
    sampled = token_cache.content_digest(path)
    assert sampled != whole
    with open(path, "r+b") as f:  # a change inside a sampled block (the first)
        f.write(b"y")
    assert token_cache.content_digest(path) != sampled


def test_validate_skips_the_row_scan_on_a_hit(tmp_path, tiny_model_dir, monkeypatch):
    """`validate` scans the file for bad rows only when the token cache has no entry: an entry's rows were
    checked when it was written, and the scan would read a large file once more for nothing."""
    run_module = importlib.import_module("preftune.training.run")
    data = write_jsonl(tmp_path / "data.jsonl", _records(8))
    cfg = _cfg(tiny_model_dir, data, tmp_path)
    scans = []
    real_scan = run_module._scan_train_data
    monkeypatch.setattr(run_module, "_scan_train_data", lambda c: scans.append(1) or real_scan(c))
    first = run_module.validate(cfg, load_weights=False, log=quiet)
    assert len(scans) == 1
    other = _cfg(tiny_model_dir, data, tmp_path, data={"max_length": 48})  # another entry: a miss, scanned
    run_module.validate(other, load_weights=False, log=quiet)
    assert len(scans) == 2
    _no_reading(monkeypatch)
    assert run_module.validate(cfg, load_weights=False, log=quiet) == first and len(scans) == 2
