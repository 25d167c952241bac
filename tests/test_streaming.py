"""Streamed data (``data.streaming: true``, data/stream.py): row iterators equal to load_rows, the shuffle
buffer, streamed training equal to the same records trained whole, resume at the exact record, bad records
mid-stream, and ``preftune validate`` over every record of a file (the first 20 problems, then a count)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_cfg, metrics, pair_records, quiet, raw_config, write_jsonl

import preftune
import preftune.data.stream as stream_module
from preftune.cli import main
from preftune.config import ConfigError
from preftune.data import DataError, load_rows, validate_rows
from preftune.data.load import iter_rows
from preftune.data.stream import ExampleStream, scan_pairs, shuffled
from preftune.training import train
from preftune.training.pairs import PairFamily


def streamed(**training) -> dict:
    return {"data": {"streaming": True, "shuffle_buffer": 4}, "training": {"max_steps": 6, **training}}


# --- row iterators ---------------------------------------------------------------------------------------


def _write_all_formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "p.jsonl", records[:2] + [{}] + records[2:])  # line 3: {} (no fields)
    (tmp_path / "p.jsonl").write_text(jsonl.read_text().replace("{}\n", "\n", 1))  # a blank line, counted
    csv_path = tmp_path / "p.csv"
    header = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    lines = [",".join(header)] + [
        ",".join(json.dumps(r[k]) if isinstance(r[k], str) else str(r[k]) for k in header) for r in records
    ]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved))
    return {"jsonl": jsonl, "csv": csv_path, "parquet": parquet, "saved": saved}


def test_iter_rows_gives_load_rows_rows_and_sources_for_every_format(tmp_path):
    records = pair_records(5)
    for kind, path in _write_all_formats(tmp_path, records).items():
        whole = load_rows(path)
        assert list(iter_rows(path)) == whole, kind
        assert len(whole) == 5, kind
    assert [r["_source"] for r in iter_rows(tmp_path / "p.jsonl")][2] == f"{tmp_path / 'p.jsonl'} line 4"
    assert [r["_source"] for r in iter_rows(tmp_path / "p.csv")][0] == f"{tmp_path / 'p.csv'} line 2"
    saved = [r["_source"] for r in iter_rows(tmp_path / "saved")]
    assert saved[4] == f"{tmp_path / 'saved'} [train] record 4"


def test_iter_rows_reports_every_unreadable_record_with_load_rows_message(tmp_path):
    good = json.dumps(pair_records(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_bytes(f'{good}\n{{"prompt": \n[1]\n{good}\nbad \xff byte\n'.encode("latin-1"))
    problems: list[str] = []
    rows = list(iter_rows(path, on_error=problems.append))
    assert [r["_source"] for r in rows] == [f"{path} line 1", f"{path} line 4"]
    assert problems[0].startswith(f"{path} line 2: malformed JSON")
    assert problems[1] == f"{path} line 3: expected a JSON object, got list"
    assert problems[2].startswith(f"{path} line 5: not valid UTF-8 (byte 0xff at column 5)")
    with pytest.raises(DataError) as whole:
        load_rows(path)
    assert "line 5: not valid UTF-8 (byte 0xff at column 5)" in str(whole.value)  # read_text's, the same
    path.write_text(f'{good}\n{{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError) as streamed_error:
        list(iter_rows(path))
    with pytest.raises(DataError) as whole:
        load_rows(path)
    assert str(streamed_error.value) == str(whole.value)


def test_a_json_list_cannot_be_streamed(tmp_path, tiny_model_dir):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(pair_records(3)), encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.json: a JSON list cannot be streamed.*convert it to JSONL"):
        next(iter_rows(path))
    with pytest.raises(DataError, match=r"list\.json: a JSON list cannot be streamed"):
        train(make_cfg(tiny_model_dir, path, tmp_path / "o", **streamed()), log=quiet)


# --- the shuffle buffer and the stream ------------------------------------------------------------------


def test_shuffle_buffer_keeps_every_item_once_holds_at_most_its_size_and_follows_the_seed():
    assert list(shuffled(range(10), 1, random.Random(0))) == list(range(10))
    read = []

    def source():
        for i in range(100):
            read.append(i)
            yield i

    out = []
    for item in shuffled(source(), 8, random.Random(3)):
        assert len(read) - len(out) <= 9  # read, not yet emitted: the buffer and the item replacing this one
        out.append(item)
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffled(range(100), 8, random.Random(3)))
    assert out != list(shuffled(range(100), 8, random.Random(4)))


def test_the_stream_replays_from_a_position_and_counts_passes():
    def open_pass(p):
        return iter({"p": p, "i": i} for i in range(5))

    def process(row, index):
        return None if row["i"] == 2 else (row["p"], row["i"])  # record 2 of each pass is dropped

    s = ExampleStream(open_pass, process)
    first = [s[i] for i in range(10)]
    assert first == [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0), (1, 1), (1, 3), (1, 4), (2, 0), (2, 1)]
    position = s.position_before(6)
    assert position == (1, 2)  # pass 1, after its records 0 and 1
    calls = []
    replay = ExampleStream(open_pass, lambda row, i: calls.append(row) or process(row, i))
    replay.seek(position, 6)
    assert [replay[i] for i in range(6, 10)] == first[6:]
    assert calls[0] == {"p": 1, "i": 2}  # the skipped records were not processed
    with pytest.raises(DataError, match="gave no example"):
        ExampleStream(lambda p: iter([{"i": 2}]), process)[0]


# --- config ---------------------------------------------------------------------------------------------


def test_streaming_needs_max_steps_and_a_pair_method(tmp_path, tiny_model_dir):
    f = tmp_path / "p.jsonl"
    base = raw_config(tiny_model_dir, f, tmp_path / "o", data={"streaming": True})
    base["training"].pop("max_steps")
    from preftune.config import train_config_from_dict

    with pytest.raises(ConfigError, match="data.streaming: true needs training.max_steps"):
        train_config_from_dict(base)
    for extra, message in [
        ({"data": {"eval_fraction": 0.2}}, "data.eval_fraction needs the whole training set"),
        ({"data": {"shuffle_buffer": 0}}, "data.shuffle_buffer must be >= 1"),
    ]:
        cfg = raw_config(tiny_model_dir, f, tmp_path / "o", **streamed())
        method = extra.pop("method", None)
        if method:
            cfg["method"] = method
        for k, v in extra.items():
            cfg[k].update(v)
        with pytest.raises(ConfigError, match=message):
            train_config_from_dict(cfg)


# --- training -------------------------------------------------------------------------------------------


@pytest.fixture
def seen(monkeypatch):
    """The records (file and line) of every training micro-batch, in order."""
    batches: list[list[str]] = []
    make_batch = PairFamily.make_batch

    def recording(self, split, indices):
        batch = make_batch(self, split, indices)
        if split == "train":
            batches.append([p.source for p in batch["pairs"]])
        return batch

    monkeypatch.setattr(PairFamily, "make_batch", recording)
    return batches


def test_streamed_resume_continues_at_the_exact_record(tmp_path, tiny_model_dir, seen, monkeypatch):
    records = pair_records(11)
    records[4]["rejected"] = records[4]["chosen"]  # identical: dropped when tokenised
    data = write_jsonl(tmp_path / "p.jsonl", records)  # 10 pairs kept: 6 steps of 2 start a second pass
    train(make_cfg(tiny_model_dir, data, tmp_path / "a", **streamed()), log=quiet)
    uninterrupted = list(seen)
    assert len(uninterrupted) == 6
    flat = [s for b in uninterrupted for s in b]
    kept = [f"{data} line {n}" for n in range(1, 12) if n != 5]
    assert sorted(flat[:10]) == sorted(kept)  # the first pass: every kept pair once
    assert [r["epoch"] for r in metrics(tmp_path / "a")] == [0, 0, 0, 0, 0, 1]

    seen.clear()
    cfg_b = make_cfg(tiny_model_dir, data, tmp_path / "b", **streamed())

    def stop(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, on_step_end=stop, log=quiet)
    state = json.loads((tmp_path / "b/checkpoints/step-0000003/trainer_state.json").read_text())
    assert state["stream"]["positions"]["3"][0] == 0
    processed = []
    call = stream_module.PairProcessor.__call__
    counting = lambda self, row, i: processed.append(row) or call(self, row, i)  # noqa: E731
    monkeypatch.setattr(stream_module.PairProcessor, "__call__", counting)
    train(cfg_b, resume=True, log=quiet)
    assert seen == uninterrupted
    assert len(processed) == 6  # steps 4-6 only: the first 3 steps' records were skipped untokenised
    wa, wb = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_streamed_training_equals_the_same_records_trained_whole(tmp_path, tiny_model_dir, seen):
    """StepPlan visits randperm(8, seed) in epoch 0: the streamed file holds the records in that order and
    streams them unshuffled (buffer 1), so both runs must take the same steps on the same pairs."""
    records = pair_records(8)
    whole = write_jsonl(tmp_path / "whole.jsonl", records)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    ordered = write_jsonl(tmp_path / "ordered.jsonl", [records[i] for i in order])
    common = {"training": {"max_steps": 4, "precompute_ref": False}}
    train(make_cfg(tiny_model_dir, whole, tmp_path / "whole", **common), log=quiet)
    whole_batches = [[s.split(" line ")[1] for s in b] for b in seen]
    seen.clear()
    sections = {"data": {"streaming": True, "shuffle_buffer": 1}, **common}
    train(make_cfg(tiny_model_dir, ordered, tmp_path / "stream", **sections), log=quiet)
    stream_batches = [[str(order[int(s.split(" line ")[1]) - 1] + 1) for s in b] for b in seen]
    assert stream_batches == whole_batches and len(whole_batches) == 4
    wa, wb = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "stream"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    for ra, rb in zip(metrics(tmp_path / "whole"), metrics(tmp_path / "stream"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_a_bad_record_mid_stream_stops_training_naming_its_line(tmp_path, tiny_model_dir):
    records = pair_records(8)
    del records[5]["chosen"]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    sections = {"data": {"streaming": True, "shuffle_buffer": 1}, "training": {"max_steps": 4}}
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "o", **sections)
    with pytest.raises(DataError, match=rf"{data} line 6: field 'chosen': missing"):
        train(cfg, log=quiet)
    assert [r["step"] for r in metrics(tmp_path / "o")] == [1, 2]  # steps before the record trained


def test_streamed_reward_model_trains(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(6))
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "rm", method="reward_model", **streamed())
    run = train(cfg, log=quiet)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


# --- validate -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_validate_lists_the_first_20_problems_with_their_lines_and_counts_the_rest(
    tmp_path, tiny_model_dir, capsys, streaming
):
    records = pair_records(60)
    lines = [json.dumps(r) for r in records]
    bad_lines = list(range(3, 103, 2))[:50]  # 1-based line numbers of 50 bad records
    for k, n in enumerate(bad_lines):
        if k % 5 == 0:
            lines.insert(n - 1, '{"prompt": "p", "chosen": ')  # malformed JSON
        else:
            lines.insert(n - 1, json.dumps({"prompt": "p", "chosen": "c"}))  # no rejected
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = raw_config(tiny_model_dir, data, tmp_path / "o", data={"streaming": streaming})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    assert main(["validate", str(config), "--no-model"]) == 2
    err = capsys.readouterr().err
    listed = [line.strip() for line in err.splitlines() if line.startswith(f"  {data} line ")]
    assert len(listed) == 20
    assert [int(s.split(" line ")[1].split(":")[0]) for s in listed] == bad_lines[:20]
    assert "  ... and 30 more" in err and "50 problem(s) in 100 row(s)" in err
    assert "malformed JSON" in listed[0] and "field 'rejected': missing" in listed[1]


def test_scan_problems_are_validate_rows_problems(tmp_path):
    records = pair_records(4)
    records[1]["chosen"], records[3]["score_chosen"] = "", "high"
    data = write_jsonl(tmp_path / "p.jsonl", records)
    scan = scan_pairs(str(data), require_scores=True)
    with pytest.raises(DataError) as whole:
        validate_rows(load_rows(data), require_scores=True)
    assert scan.message() == str(whole.value)


def two_processes_equal_one(tmp_path: Path, env: dict) -> None:
    """Train ``tmp_path/two.yaml`` on 2 gloo processes and ``one.yaml`` on one; their final weights agree to
    fp32 reduction order."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run(
        [*launch, "train", str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(tmp_path / "one.yaml")], env=env, check=True,
        capture_output=True, timeout=300,
    )  # fmt: skip
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("two", "one"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_stream_the_same_steps_as_one(tmp_path, tiny_model_dir):
    """2 gloo ranks × 2 pairs == 1 process × 4 pairs on a stream that starts a second pass at step 3."""
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(10))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for name, batch in (("two", 2), ("one", 4)):
        cfg = raw_config(tiny_model_dir, data, tmp_path / name, **streamed(max_steps=3, batch_size=batch))
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    two_processes_equal_one(tmp_path, env)
    for r2, r1 in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one"), strict=True):
        assert r2["examples"] == r1["examples"] == 4 and r2["epoch"] == r1["epoch"]
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-6)


def test_validate_tokenises_the_first_streamed_records_and_counts_their_drops(tmp_path, tiny_model_dir):
    """A streamed config's validate reads and tokenises the first records as training would (up to 256
    examples of the first pass): their drops (identical responses) are counted in its summary, as they stood
    after the first pass's last kept example (reading on to find the pass ended counts nothing twice)."""
    records = pair_records(10)
    for r in records[2:5]:
        r["rejected"] = r["chosen"]  # identical: dropped by tokenisation
    records[0]["rejected"] = records[0]["chosen"]  # the first: a second pass would read it again
    records[1]["rejected"] = records[1]["chosen"]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    cfg = raw_config(tiny_model_dir, data, tmp_path / "o", **streamed(max_steps=2))
    summary = preftune.validate(cfg, load_weights=False, log=quiet)
    train = summary["tokenize"]["train"]
    assert (train["total"], train["kept"], train["dropped_identical"]) == (10, 5, 5)
    assert (
        train["of"] == "the records read for the first 5 streamed examples (the shuffle buffer reads ahead)"
    )
