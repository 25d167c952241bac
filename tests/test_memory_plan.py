"""The memory plan (training/memory.py): its arithmetic by hand on a tiny shape, the activation count against
what autograd actually keeps, and the plan that ``preftune validate`` fills in from a prepared run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from preftune.models import enable_gradient_checkpointing
from preftune.training.memory import (
    BASELINE_BYTES,
    CHECKPOINT_HIDDEN,
    CHUNK_ELEMENTS,
    Decoding,
    MemoryPlan,
    MicroBatch,
    ModelShape,
    activation_bytes,
    decoding_rows,
    kv_cache_bytes,
    logits_bytes,
    longest_group_batch,
    longest_pair_batch,
    memory_plan,
)

TINY = ModelShape(layers=2, hidden=32, intermediate=64, kv_heads=2, head_dim=8, vocab=100)


def test_activations_logits_and_kv_cache_by_hand():
    # per layer and token 11·32 + 4·64 = 608 floats: 2 layers × 10 tokens × 608 × 4 bytes
    assert activation_bytes(TINY, 10, checkpointing=False) == 2 * 10 * 608 * 4 == 48640
    # checkpointed: 2 layers × 10 tokens × 32 × 4 × 1.6 (the layer inputs) + one layer's 10 × 608 × 4
    assert CHECKPOINT_HIDDEN == 1.6
    assert activation_bytes(TINY, 10, checkpointing=True) == 4096 + 24320
    assert logits_bytes(TINY, 6) == 2 * 6 * 100 * 4  # the log-softmax output and its gradient
    wide = ModelShape(layers=2, hidden=32, intermediate=64, kv_heads=2, head_dim=8, vocab=1 << 20)
    assert logits_bytes(wide, 100) == 2 * CHUNK_ELEMENTS * 4  # 100 × 2²⁰ logits > 2²⁶: the chunked head
    # 2 layers × (k, v) × 2 kv heads × 8 dims × 12 positions × 4 rows × 4 bytes + 3 × 4 rows × 100 logits × 4
    assert kv_cache_bytes(TINY, Decoding(rows=4, length=12)) == 12288 + 4800
    assert kv_cache_bytes(TINY, Decoding(rows=4, length=12), element_bytes=2) == 6144 + 4800


def test_the_plan_is_the_resident_part_and_the_larger_phase():
    common = dict(parameter_bytes=4000, trainable=1000, reference_kind="frozen copy", reference_bytes=4000,
                  batch=MicroBatch(tokens=10, response_tokens=6), gradient_checkpointing=False)  # fmt: skip
    plan = memory_plan(TINY, **common, decoding=Decoding(rows=4, length=12), processes=2)
    assert (plan.optimizer, plan.gradients, plan.ddp_buckets) == (8000, 4000, 4000)
    assert plan.resident == 4000 + 8000 + 4000 + 4000
    assert plan.training == 4000 + 48640 + 4800 and plan.sampling == 17088
    assert plan.total == BASELINE_BYTES + 20000 + 57440  # training is the larger phase
    assert plan.activations_other == 28416  # with checkpointing
    long_decoding = memory_plan(TINY, **common, decoding=Decoding(rows=64, length=100))
    assert long_decoding.ddp_buckets == 0  # one process
    assert long_decoding.sampling == 2 * 2 * 2 * 8 * 100 * 64 * 4 + 3 * 64 * 100 * 4 == 1715200
    assert long_decoding.total == BASELINE_BYTES + 16000 + 1715200
    assert MemoryPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    text = "\n".join(plan.lines())
    assert "2 processes" in text and "DDP gradient buckets" in text and "frozen copy" in text
    assert f"{plan.total / 1e9:.2f} GB  baseline + resident + the training phase" in text


def test_a_sharded_plan_splits_the_state_and_gathers_a_layer_or_the_model():
    common = dict(parameter_bytes=4000, trainable=1000, reference_kind="frozen copy", reference_bytes=4000,
                  batch=MicroBatch(tokens=10, response_tokens=6), gradient_checkpointing=False)  # fmt: skip
    plan = memory_plan(TINY, **common, decoding=Decoding(rows=4, length=12), processes=2, sharded=True)
    # parameters, AdamW moments, the π_ref copy and the gradients halve; no DDP buckets
    assert (plan.parameters, plan.optimizer, plan.reference, plan.ddp_buckets) == (2000, 4000, 2000, 0)
    assert plan.gradients == 2000 + 4000 // 2  # own gradient shard + one gathered decoder layer (2 layers)
    kept = memory_plan(TINY, **common, processes=2, sharded=True, reshard_after_forward=False)
    assert kept.gradients == 2000 + 2000  # every layer's other half stays gathered till the backward
    assert plan.sampling == 17088 + 2000  # the KV cache + the other process's half, gathered for decoding
    one = memory_plan(TINY, **common, decoding=Decoding(rows=4, length=12), processes=1, sharded=True)
    unsharded = memory_plan(TINY, **common, decoding=Decoding(rows=4, length=12), processes=1)
    assert one == unsharded  # one process holds everything either way
    precomputed = {**common, "reference_kind": "precomputed log-probs", "reference_bytes": 80}
    assert memory_plan(TINY, **precomputed, processes=2, sharded=True).reference == 80  # not sharded


def test_longest_micro_batches_by_hand():
    # pairs (prompt, chosen, rejected) = (3, 4, 1) and (5, 2, 6): shared rows of 8 and 13 tokens
    assert longest_pair_batch([3, 5], [4, 2], [1, 6], 1, share_prefix=True) == MicroBatch(13, 8)
    # plain rows: prompt + response, the longest 5 + 6 = 11, four rows; responses 5 + 8
    assert longest_pair_batch([3, 5], [4, 2], [1, 6], 2, share_prefix=False) == MicroBatch(44, 13)
    # 8 completions of 5 tokens in groups of 4: two rows of 10 + 4 × 5
    assert longest_group_batch(10, 5, 4, 8, share_prefix=True) == MicroBatch(60, 40)
    assert longest_group_batch(10, 5, 4, 8, share_prefix=False) == MicroBatch(120, 40)
    assert longest_group_batch(10, 5, 4, 3, share_prefix=True) == MicroBatch(30, 20)  # a whole group at least
    assert decoding_rows(64, 8, 2) == 16 and decoding_rows(64, 8, 100) == 64 and decoding_rows(5, 8, 4) == 8


def test_model_shape_from_llama_and_gpt2_configs():
    from transformers import LlamaConfig

    llama = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    assert ModelShape.from_config(llama) == ModelShape(3, 64, 176, 2, 16, 50)
    gpt2 = {"n_layer": 2, "n_embd": 48, "n_head": 4, "vocab_size": 70, "n_inner": None}
    assert ModelShape.from_config(gpt2) == ModelShape(2, 48, 192, 4, 12, 70)


def _saved_bytes(layers: int, checkpointing: bool, tokens: tuple[int, int] = (2, 40)) -> int:
    """Bytes of the tensors autograd saves for the backward of a tiny Llama's decoder (parameters excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 50, tokens))
    return sum(storages.values())


def test_the_activation_count_matches_what_autograd_keeps():
    """Per layer and token, what autograd saves for the backward of a Llama decoder layer (the difference
    between 4 and 2 layers) is the planned count to within 15% (the plan's 11·hidden + 4·intermediate is what
    the RSS of SmolLM2-135M measured, a little above the saved tensors' own bytes); checkpointed, a layer keeps
    its input: 1·hidden."""
    shape = ModelShape(layers=1, hidden=64, intermediate=176, kv_heads=2, head_dim=16, vocab=50)
    tokens = 2 * 40
    per_layer = (_saved_bytes(4, False) - _saved_bytes(2, False)) / 2
    planned = activation_bytes(shape, tokens, checkpointing=False)
    assert 0.85 * planned <= per_layer <= planned, (per_layer, planned)
    kept = (_saved_bytes(4, True) - _saved_bytes(2, True)) / 2
    assert kept == tokens * 64 * 4  # the layer's input, (2, 40, 64) fp32
    assert kept <= activation_bytes(shape, tokens, checkpointing=True) - planned <= 2 * kept


@pytest.fixture
def pairs_file(tmp_path):
    rows = [
        {"prompt": f"The movie {i} was", "chosen": " great and wonderful.", "rejected": " bad."}
        for i in range(6)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dpo(tmp_path, model_dir, data, **training):
    return {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 1, **training},
    }


def test_validate_plans_a_pair_run(tmp_path, tiny_model_dir, tiny_tokenizer, pairs_file):
    from preftune.config import train_config_from_dict
    from preftune.training import prepare, validate

    raw = _dpo(tmp_path, tiny_model_dir, pairs_file)
    quiet = lambda *a: None  # noqa: E731
    summary = validate(raw, log=quiet)
    plan = MemoryPlan.from_dict(summary["memory_plan"])
    n = summary["parameters"]
    assert summary["trainable_parameters"] == n
    assert (plan.parameters, plan.gradients, plan.optimizer, plan.ddp_buckets) == (4 * n, 4 * n, 8 * n, 0)
    assert plan.reference_kind == "precomputed log-probs" and plan.reference == 8 * 6  # 6 pairs × 2 × fp32
    examples = prepare(train_config_from_dict(raw), quiet).examples["train"]
    longest = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    shape = ModelShape(
        layers=2, hidden=32, intermediate=64, kv_heads=2, head_dim=8, vocab=len(tiny_tokenizer)
    )
    assert plan.activations == activation_bytes(shape, 2 * longest, checkpointing=False)
    responses = sorted((len(e.chosen_ids) + len(e.rejected_ids) for e in examples), reverse=True)
    assert plan.logits == logits_bytes(shape, sum(responses[:2])) and plan.sampling == 0

    on_the_fly = validate(_dpo(tmp_path, tiny_model_dir, pairs_file, precompute_ref=False), num_processes=2,
                          log=quiet)["memory_plan"]  # fmt: skip
    assert on_the_fly["reference_kind"] == "frozen copy" and on_the_fly["reference"] == 4 * n
    assert on_the_fly["ddp_buckets"] == 4 * n
    lora = _dpo(tmp_path, tiny_model_dir, pairs_file, precompute_ref=False, gradient_checkpointing=True)
    lora["model"]["lora"] = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    summary = validate(lora, log=quiet)
    plan = MemoryPlan.from_dict(summary["memory_plan"])
    trainable = summary["trainable_parameters"]
    assert trainable < n and plan.optimizer == 8 * trainable and plan.gradients == 4 * trainable
    assert plan.reference == 0 and plan.reference_kind.startswith("adapters disabled")
    assert plan.gradient_checkpointing and plan.activations < plan.activations_other


@pytest.mark.parametrize("beta, evaluate, kind", [(0.0, False, "none"), (0.1, False, "frozen copy"),
                                                  (0.0, True, "frozen copy (evaluation KL")])  # fmt: skip
def test_validate_plans_an_online_run(tmp_path, tiny_model_dir, tiny_tokenizer, beta, evaluate, kind):
    from preftune.config import train_config_from_dict
    from preftune.training import prepare, validate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(8)))
    raw = {
        "method": "grpo",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24,
                 **({"eval": str(prompts)} if evaluate else {})},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 1},
        "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 4, "beta": beta,
                 "rewards": [{"name": "regex", "pattern": "e"}]},
    }  # fmt: skip
    summary = validate(raw, log=lambda *a: None)
    plan = summary["memory_plan"]
    assert plan["reference_kind"].startswith(kind)
    assert plan["reference"] == (0 if kind == "none" else 4 * summary["parameters"])
    # 8 rows decoded at once (2 prompts × 4), each up to the longest prompt + 6 new tokens
    shape = ModelShape(
        layers=2, hidden=32, intermediate=64, kv_heads=2, head_dim=8, vocab=len(tiny_tokenizer)
    )
    examples = prepare(train_config_from_dict(raw), lambda *a: None).examples["train"]
    longest = max(len(e.prompt_ids) for e in examples)
    assert plan["sampling"] == kv_cache_bytes(shape, Decoding(rows=8, length=longest + 6))
    # one micro-batch of 4 completions: one row of the prompt + 4 × 6 tokens, 24 response positions
    assert plan["activations"] == activation_bytes(shape, longest + 24, checkpointing=False)
    assert plan["logits"] == logits_bytes(shape, 4 * 6)


def test_cli_validate_prints_the_plan(tmp_path, tiny_model_dir, pairs_file, capsys):
    from preftune.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_dpo(tmp_path, tiny_model_dir, pairs_file)))
    assert main(["validate", str(path), "--num-processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per process (2 processes):" in out and "DDP gradient buckets" in out
    assert "  peak " in out and '"memory_plan"' not in out  # lines, not the JSON dict
    assert main(["validate", str(path), "--no-model"]) == 0
    assert "memory plan" not in capsys.readouterr().out  # the plan counts the model's parameters
