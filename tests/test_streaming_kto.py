"""Streamed KTO records and streamed micro-batches cut by ``training.max_tokens_per_batch``: each equals the
same records trained whole (the same records per step, weights within 1e-6), and what a stream cannot
check up front (both KTO labels, pair data given to KTO) is refused before step 1 with the file named."""

from __future__ import annotations

import pytest
import torch
from test_kto import unpaired_records
from test_training import assert_weights_close, make_cfg, metrics, pair_records, quiet, weights, write_jsonl

from preftune.data import DataError
from preftune.training import train
from preftune.training.kto import KTOFamily
from preftune.training.pairs import PairFamily


def _file_order(n: int) -> list[int]:
    """The records StepPlan visits in epoch 0 (seed 0): a file in this order, streamed unshuffled (buffer 1),
    gives the streamed run the whole-file run's steps."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture
def seen(monkeypatch):
    """The prompts of every training batch (micro-batch or pass), in order, for pairs and KTO records."""
    batches: list[list[str]] = []
    for family, key in ((PairFamily, "pairs"), (KTOFamily, "records")):

        def recording(self, split, indices, _make=family.make_batch, _key=key):
            batch = _make(self, split, indices)
            if split == "train":
                batches.append([e.prompt_ids for e in batch[_key]])
            return batch

        monkeypatch.setattr(family, "make_batch", recording)
    return batches


def test_streamed_kto_equals_the_same_records_trained_whole(tmp_path, tiny_model_dir, seen):
    records = unpaired_records(8)
    order = _file_order(8)
    whole = write_jsonl(tmp_path / "whole.jsonl", records)
    ordered = write_jsonl(tmp_path / "ordered.jsonl", [records[i] for i in order])
    common = {"training": {"max_steps": 4}}
    train(make_cfg(tiny_model_dir, whole, tmp_path / "whole", method="kto", **common), log=quiet)
    whole_batches = list(seen)
    seen.clear()
    sections = {"data": {"streaming": True, "shuffle_buffer": 1}, **common}
    train(make_cfg(tiny_model_dir, ordered, tmp_path / "stream", method="kto", **sections), log=quiet)
    assert seen == whole_batches and len(seen) == 4
    assert_weights_close(weights(tmp_path / "whole/model"), weights(tmp_path / "stream/model"), 1e-6)
    for a, b in zip(metrics(tmp_path / "whole"), metrics(tmp_path / "stream"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    assert metrics(tmp_path / "stream")[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # KTO's first step


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_stream_cut_by_max_tokens_per_batch_takes_the_undivided_steps(
    tmp_path, tiny_model_dir, method, seen
):
    """Batches of 4 records in passes of at most 60 padded tokens (2 records each here): the same steps as the
    stream without a token limit, and every pass within the limit."""
    records = unpaired_records(12) if method == "kto" else pair_records(12)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    runs = {}
    for name, limit in (("whole", None), ("cut", 60)):
        seen.clear()
        sections = {
            "data": {"streaming": True, "shuffle_buffer": 4},
            "training": {"max_steps": 3, "batch_size": 4, "max_tokens_per_batch": limit},
        }
        train(make_cfg(tiny_model_dir, data, tmp_path / name, method=method, **sections), log=quiet)
        runs[name] = list(seen)
    assert len(runs["whole"]) == 3 and len(runs["cut"]) > 3  # cut into passes
    # the same records (a pass orders its share by length)
    assert sorted(p for b in runs["cut"] for p in b) == sorted(p for b in runs["whole"] for p in b)
    assert_weights_close(weights(tmp_path / "whole/model"), weights(tmp_path / "cut/model"), 1e-5)
    for a, b in zip(metrics(tmp_path / "whole"), metrics(tmp_path / "cut"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_streamed_kto_refuses_pairs_and_a_missing_label_before_step_1(tmp_path, tiny_model_dir):
    streamed = {"data": {"streaming": True}, "training": {"max_steps": 2}}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(4))
    with pytest.raises(DataError, match=rf"{pairs} line 1 is a pair"):
        train(make_cfg(tiny_model_dir, pairs, tmp_path / "a", method="kto", **streamed), log=quiet)
    good = [r for r in unpaired_records(8) if r["label"]]
    one_label = write_jsonl(tmp_path / "good.jsonl", good)
    with pytest.raises(
        DataError, match=r"first 4 streamed records.*4 desirable and 0 undesirable records: no undesirable"
    ):
        train(make_cfg(tiny_model_dir, one_label, tmp_path / "b", method="kto", **streamed), log=quiet)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    # one label is fine when the other's weight is 0
    only = {**streamed, "kto": {"undesirable_weight": 0.0}}
    train(make_cfg(tiny_model_dir, one_label, tmp_path / "c", method="kto", **only), log=quiet)
    assert [r["step"] for r in metrics(tmp_path / "c")] == [1, 2]
