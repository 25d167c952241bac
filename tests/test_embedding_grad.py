"""The tied embedding's gradient added by index (training/embedding_grad.py): the same gradients as
PyTorch's dense embedding backward (padding rows included, over accumulated passes), switched on only where
that is exact, and a one-process training run equal to one without it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model
from test_training import assert_weights_close, make_cfg, pair_records, quiet, weights, write_jsonl

import preftune.training.harness as harness
from preftune.training import train
from preftune.training.embedding_grad import IndexGradEmbedding, use_index_grad_embedding


def _tied(tokenizer, seed: int = 0):
    model = build_tiny_model(tokenizer, seed)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_the_gradients_equal_the_dense_backward_padding_rows_included(tiny_tokenizer):
    dense = _tied(tiny_tokenizer)
    pad = dense.model.embed_tokens.padding_idx
    assert pad is not None  # the padding row: no gradient from the lookup, the head's only
    indexed = copy.deepcopy(dense)
    assert use_index_grad_embedding(indexed) and type(indexed.model.embed_tokens) is IndexGradEmbedding
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tiny_tokenizer), (3, 9), generator=g) for _ in range(2)]
    batches[0][0, :4] = pad
    for model in (dense, indexed):
        for ids in batches:  # two passes accumulate into .grad
            model(input_ids=ids).logits.float().pow(2).mean().backward()
    for (name, a), b in zip(dense.named_parameters(), indexed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-8, msg=name)
    with torch.no_grad():  # no gradient wanted: the plain lookup
        torch.testing.assert_close(indexed(input_ids=batches[1]).logits, dense(input_ids=batches[1]).logits)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_bf16_repeats_of_a_row_are_summed_in_fp32_before_rounding(device):
    """Under FSDP2 with bf16 the weight the lookup adds into is the gathered bf16 copy: a token repeated 4096
    times gets its gradient summed in fp32 and rounded once (as the dense backward). On CPU ``index_add_``
    accumulates bf16 in fp32 itself; on CUDA its bf16 atomics round at every add (these sums would stall near
    256: not run here, no GPU)."""
    emb = torch.nn.Embedding(50, 16).to(device, torch.bfloat16)
    emb.__class__ = IndexGradEmbedding
    ids = torch.full((4096,), 3, device=device)
    ids[:100] = torch.arange(100, device=device) % 50
    grad = torch.rand(4096, 16, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    emb(ids).backward(grad)  # the sums grow to ~2000, where bf16's spacing is 16
    exact = torch.zeros(50, 16, dtype=torch.float64, device=device).index_add_(0, ids, grad.double())
    assert float((emb.weight.grad.double() - exact).abs().max() / exact.abs().max()) < 5e-3


def test_it_is_switched_on_only_where_exact(tiny_tokenizer):
    assert not use_index_grad_embedding(build_tiny_model(tiny_tokenizer))  # untied: nothing to save
    frozen = _tied(tiny_tokenizer)
    frozen.model.embed_tokens.weight.requires_grad_(False)
    assert not use_index_grad_embedding(frozen)
    scaled = _tied(tiny_tokenizer)
    scaled.model.embed_tokens.scale_grad_by_freq = True
    assert not use_index_grad_embedding(scaled)


@pytest.fixture
def tied_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tied-llama")
    _tied(tiny_tokenizer).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_a_run_equals_the_dense_backward(tmp_path, tied_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(8))
    sections = {"training": {"max_steps": 3, "grad_accum": 2, "precompute_ref": False}}
    used = []
    real = harness.use_index_grad_embedding
    monkeypatch.setattr(
        harness, "use_index_grad_embedding", lambda model: used.append(real(model)) or used[-1]
    )
    train(make_cfg(tied_model_dir, data, tmp_path / "index", **sections), log=quiet)
    assert used == [True]
    monkeypatch.setattr(harness, "use_index_grad_embedding", lambda model: False)
    train(make_cfg(tied_model_dir, data, tmp_path / "dense", **sections), log=quiet)
    a, b = weights(tmp_path / "index/model"), weights(tmp_path / "dense/model")
    assert_weights_close(a, b, 1e-6)
    start = weights(tied_model_dir)
    assert not torch.equal(a["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # it trained


def test_under_fsdp_the_rows_added_by_index_take_the_steps_of_one_process(
    tmp_path, tied_model_dir, monkeypatch
):
    """FSDP2 reduce-scatters the root unit (embedding and tied head) in its callback at the end of the
    backward, after the lookup has added its rows: 2 sharded processes (accumulation 2, the second micro-batch
    split 2 + 1) take the steps of one process with the doubled batch and PyTorch's dense embedding backward,
    the tied weight included."""
    from test_sharding import LAUNCH2, _cli, _dpo, _max_diff, _write_config

    data = write_jsonl(tmp_path / "p.jsonl", pair_records(7))
    _cli(LAUNCH2, tmp_path, "train", _write_config(tmp_path, "two", _dpo(tied_model_dir, data, "fsdp", 2)))
    monkeypatch.setattr(harness, "use_index_grad_embedding", lambda model: False)
    train(_write_config(tmp_path, "one", _dpo(tied_model_dir, data, "none", 4)), log=quiet)
    two, one = weights(tmp_path / "two/model"), weights(tmp_path / "one/model")
    assert _max_diff(two, one) < 1e-5
    start = weights(tied_model_dir)["model.embed_tokens.weight"]
    assert float((one["model.embed_tokens.weight"] - start).abs().max()) > 1e-4  # the tied weight trained
