"""Mixed precision: fp32 master weights under bf16 autocast (CPU autocast supports bf16), half-precision storage
only for frozen weights, and a refusal for configs that would train half-precision weights directly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_cfg, metrics, quiet, raw_config, weights

from preftune.config import ConfigError, train_config_from_dict
from preftune.training import train


@pytest.fixture
def data(tmp_path):
    from test_training import pair_records, write_jsonl

    return write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))


def test_half_precision_weights_with_full_fine_tuning_are_refused(tmp_path, tiny_model_dir, data):
    raw = raw_config(tiny_model_dir, data, tmp_path / "r", model={"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="model.dtype: float32 and training.mixed_precision: bf16"):
        train_config_from_dict(raw)
    with pytest.raises(ConfigError, match="mixed_precision must be one of no, bf16, fp16"):
        train_config_from_dict(
            raw_config(tiny_model_dir, data, tmp_path / "r", training={"mixed_precision": "fp8"})
        )
    # YAML reads a bare `no` as false: it still means "no"
    cfg = train_config_from_dict(
        raw_config(tiny_model_dir, data, tmp_path / "r", training={"mixed_precision": False})
    )
    assert cfg.training.mixed_precision == "no"


def test_bf16_rounds_away_small_updates_that_fp32_master_weights_keep():
    """Why the refusal: AdamW's first steps move each weight by about lr; at 5e-6 on weights of 0.03 that is
    below half a bf16 ulp (2**-13 ≈ 1.2e-4), so bf16 weights do not move at all."""
    for dtype, moved in ((torch.bfloat16, False), (torch.float32, True)):
        w = torch.nn.Parameter(torch.full((1000,), 0.03, dtype=dtype))
        opt = torch.optim.AdamW([w], lr=5e-6, weight_decay=0.0)
        start = w.detach().clone()
        for _ in range(10):
            w.grad = torch.ones_like(w)
            opt.step()
        assert bool((w.detach() != start).any()) is moved


def test_bf16_mixed_precision_keeps_fp32_master_weights_and_tracks_fp32(tmp_path, tiny_model_dir, data):
    small = {"training": {"max_steps": 2, "learning_rate": 5e-6, "mixed_precision": "bf16"}}
    mixed = train(make_cfg(tiny_model_dir, data, tmp_path / "small", **small), log=quiet)
    base = load_file(tiny_model_dir / "model.safetensors")
    w = weights(mixed / "model")
    assert all(v.dtype == torch.float32 for v in w.values())  # saved master weights are fp32
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w[name], base[name])  # a step at lr 5e-6 changes the weights
    # the bf16 run follows the fp32 loss curve, at a rate where the curve moves (3.5e-2 over 4 steps):
    # measured 8e-5 apart, so 2% of the movement is a 9x margin, and a run that moved half as far (a
    # rescaled update: 1.7e-2 off) is far outside it
    sections = {"training": {"max_steps": 4, "learning_rate": 1e-3}}
    fp32 = train(make_cfg(tiny_model_dir, data, tmp_path / "fp32", **sections), log=quiet)
    sections["training"]["mixed_precision"] = "bf16"
    bf16 = train(make_cfg(tiny_model_dir, data, tmp_path / "bf16", **sections), log=quiet)
    curve32, curve16 = ([r["loss"] for r in metrics(run)] for run in (fp32, bf16))
    moved = max(abs(x - curve32[0]) for x in curve32)
    assert moved > 1e-2
    assert curve16 == pytest.approx(curve32, abs=0.02 * moved)
    assert curve16 != curve32  # ...but it did compute in bf16
    assert curve16[0] == pytest.approx(0.6931472, abs=1e-5)  # reference precomputed under the same autocast


def test_lora_keeps_frozen_base_in_half_precision_and_adapters_in_fp32(tmp_path, tiny_model_dir, data):
    from preftune.training.prepare import prepare
    from preftune.training.run import _build_model

    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    sections = {"model": {"dtype": "bfloat16", "lora": lora}, "training": {"mixed_precision": "bf16"}}
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "lora", **sections)
    model = _build_model(cfg, prepare(cfg, quiet), None)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}
    run = train(cfg, log=quiet)
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero


def test_reward_model_head_is_trained_in_fp32_under_lora(tmp_path, tiny_model_dir, data):
    from preftune.training.prepare import prepare
    from preftune.training.run import _build_model

    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    raw = raw_config(tiny_model_dir, data, tmp_path / "rm", model={"dtype": "bfloat16", "lora": lora})
    cfg = train_config_from_dict({**raw, "method": "reward_model"})
    model = _build_model(cfg, prepare(cfg, quiet), None)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("chunked", [False, True])
def test_logprob_head_runs_in_fp32_under_autocast(tiny_tokenizer, monkeypatch, chunked):
    """Under bf16 autocast the backbone computes in bf16, but the LM head (on response positions only) and
    the log-softmax run in fp32: in the model on the gathered positions, or, for long responses, not in the
    model at all (its head gets an empty input) but in the chunked log-softmax."""
    from conftest import build_tiny_model

    import preftune.logprobs as logprobs
    from preftune.data import pack_sequences

    if chunked:
        monkeypatch.setattr(logprobs, "CHUNKED_ABOVE", 0)
    model = build_tiny_model(tiny_tokenizer, seed=4).eval()
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append((tuple(a[0].shape), out.dtype)))
    batch = pack_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]], tiny_tokenizer.pad_token_id)
    captured = []
    norm = model.model.norm.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, rows = logprobs.token_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
    handle.remove(), norm.remove()
    assert [shape for shape, _ in seen] == [
        (0, 0, 32) if chunked else (5, 32)
    ]  # chunked: no logits in the model
    assert chunked or seen[0][1] == torch.float32
    assert logps.dtype == torch.float32 and torch.is_autocast_enabled("cpu") is False
    hidden = captured[0][:, :-1][batch["response_mask"][:, 1:]].float()  # (5, 32), computed in bf16
    targets = batch["input_ids"][:, 1:][batch["response_mask"][:, 1:]]
    expected = torch.log_softmax(hidden @ head.weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)  # fp32
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
