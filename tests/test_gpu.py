"""GPU paths: device placement, bf16 and fp16 mixed precision, the experiment on CUDA. Skipped without a CUDA
GPU (CI has none); run them with ``python -m pytest -m gpu`` on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from test_training import make_cfg, metrics, pair_records, quiet, weights, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_records(8))


def test_logprobs_move_cpu_batches_to_the_models_device(tiny_tokenizer):
    from conftest import build_tiny_model

    from preftune.data import pack_sequences
    from preftune.logprobs import sequence_logps

    model = build_tiny_model(tiny_tokenizer, seed=1).eval()
    batch = pack_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], tiny_tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "response_mask")
    with torch.no_grad():
        on_cpu, _ = sequence_logps(model, *(batch[k] for k in keys))
        on_gpu, _ = sequence_logps(model.cuda(), *(batch[k] for k in keys))  # CPU batch, GPU model
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_trains_fp32_master_weights_and_resumes(
    tmp_path, tiny_model_dir, data, precision
):
    from preftune.training import train

    sections = {
        "training": {"max_steps": 4, "save_every": 2, "learning_rate": 5e-6, "mixed_precision": precision}
    }
    plain = train(make_cfg(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    rows = metrics(plain)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert all(v.dtype == torch.float32 for v in weights(plain / "model").values())
    cfg = make_cfg(tiny_model_dir, data, tmp_path / "b", **sections)

    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000002"
    assert (ckpt / "scaler.pt").is_file() == (precision == "fp16")
    train(cfg, resume=True, log=quiet)
    wa, wb = weights(plain / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_on_the_fly_reference_copy_on_gpu(tmp_path, tiny_model_dir, data):
    from preftune.training import train

    sections = {"training": {"max_steps": 2, "precompute_ref": False, "mixed_precision": "bf16"}}
    run = train(make_cfg(tiny_model_dir, data, tmp_path / "r", **sections), log=quiet)
    assert metrics(run)[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)


def test_experiment_runs_on_cuda(tmp_path, tiny_model_dir):
    from test_experiment import _cfg

    from preftune.experiments.pipeline import run_experiment

    rows = run_experiment(_cfg(tmp_path, tiny_model_dir), log=quiet)
    assert [r["method"] for r in rows] == ["base", "dpo", "dpo", "simpo"]
    assert list((tmp_path / "exp" / "cache" / "ref_logps").glob("*.safetensors"))  # shared reference


_RANK_SCORER = """
import sys, torch
from accelerate import Accelerator
from preftune.rewards import load_reward
acc = Accelerator()
fn = load_reward("reward_model:" + sys.argv[1])
fn(["The movie was"], [" great."])
assert fn.fn.device == acc.device, (fn.fn.device, acc.device)
assert next(fn.fn.model.parameters()).device == acc.device
print("rank", acc.process_index, "scored on", acc.device)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_reward_model_scorer_on_each_ranks_own_gpu(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    (tmp_path / "rank.py").write_text(_RANK_SCORER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "rank.py")]
    out = subprocess.run([*cmd, str(tmp_path / "rm")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scored on cuda:0" in out.stdout and "scored on cuda:1" in out.stdout
