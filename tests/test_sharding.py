"""Sharded training (``training.sharding: fsdp``, training/sharding.py), on CPU with gloo.

The building blocks, on a tiny random Llama in torchrun workers: FSDP2 over 2 processes takes the same steps
as one unsharded process with the whole batch (weights, and the same clipped gradient norm on every rank) with
accumulation that skips the reduce-scatter (``no_sync``); a sharded checkpoint of 2 processes resumes on 1 (DCP
reshards model and AdamW moments); ``export`` of a checkpoint equals the model at that step; sampling on
gathered weights runs a different number of forward passes per process; LoRA (adapters and base in one unit)
with CPU offload, and bf16 mixed precision (bf16 compute, fp32 master weights; the adapter saved whole).

Runs through the CLI under torchrun, as the README launches them: DPO under fsdp on 2 processes equals 1
unsharded process with the doubled batch (an uneven tail too) and its checkpoints export to the run's model at
that step; a run killed after a sharded checkpoint resumes to the uninterrupted weights, on 2 processes or on
1 (the global batch kept with ``--allow-change training.batch_size``); GRPO and PPO (sampling on gathered
weights, a sharded π_ref copy, gradient checkpointing, PPO's value head beside the shards) equal the unsharded
run and save a model ``from_pretrained`` loads; LoRA over a bf16 base saves the adapter whole and merges.
GPU tests (NCCL, bf16 on 2 GPUs == 1 GPU) carry the ``gpu`` marker.

The workers run in torchrun processes: this file is also their script (``python tests/test_sharding.py CASE``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")

ROWS, COLS, LR, CLIP = 4, 12, 1e-2, 0.5
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}


def _rows(vocab: int) -> torch.Tensor:
    """(ROWS, COLS) token ids: the global batch of every step (row i trains on rank i % world)."""
    return torch.randint(0, vocab, (ROWS, COLS), generator=torch.Generator().manual_seed(0))


def _step(model, optimizer, rows: torch.Tensor, params, clip_norm, no_sync=None, world: int = 1) -> float:
    """One optimizer step over ``rows`` (this process's share), one row per micro-batch: the loss is the mean
    over the global batch of each row's mean token NLL (× world: the reduction averages over processes)."""
    import contextlib

    for i, row in enumerate(rows):
        last = i == len(rows) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync(model):
            loss = model(input_ids=row[None], labels=row[None]).loss / ROWS * world
            loss.backward()
    norm = clip_norm(params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _plain_norm(params) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, CLIP))


def _reference(model_dir: Path, steps: int, lora: bool = False):
    """The unsharded run in this process: one process, the whole batch; returns (state dict, norms)."""
    from preftune.config import LoraConfig
    from preftune.models import add_lora, load_model

    model = load_model(str(model_dir))
    if lora:
        torch.manual_seed(1)
        model = add_lora(model, LoraConfig(enabled=True, **LORA))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    rows = _rows(model.config.vocab_size)
    norms = [_step(model, optimizer, rows, params, _plain_norm) for _ in range(steps)]
    return model, norms


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _torchrun(tmp_path: Path, case: str, model_dir: Path, nproc: int) -> None:
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__, case]
    done = subprocess.run(
        [*cmd, str(model_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


# --- the workers (in torchrun processes) ---------------------------------------------------------------


def _sharded(model_dir: Path, t_kwargs: dict, lora: bool = False):
    from preftune.config import LoraConfig, TrainingConfig
    from preftune.models import add_lora, load_model
    from preftune.training import sharding

    model = load_model(str(model_dir), dtype=t_kwargs.pop("dtype", "float32"))
    if lora:
        torch.manual_seed(1)
        model = add_lora(model, LoraConfig(enabled=True, **LORA))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 master weights, as run._build_model
    sharding.shard_model(model, TrainingConfig(sharding="fsdp", **t_kwargs), torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=LR, fused=True)


def worker_blocks(model_dir: Path, out: Path) -> None:
    """2 processes: 2 sharded steps with accumulation; a sharded checkpoint after step 1; the gathered state
    dict after step 2; forwards on gathered weights and sampling, a different count per rank; π_ref."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from preftune.training import sharding
    from preftune.training.reference import setup_reference

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, params, optimizer = _sharded(model_dir, {})
    clip = lambda ps: sharding.clip_grad_norm(ps, CLIP)  # noqa: E731
    rows = _rows(model.config.vocab_size)[rank::world]
    norms = [_step(model, optimizer, rows, params, clip, sharding.no_sync, world)]
    ckpt = out / "ckpt"
    sharding.save_sharded(ckpt / sharding.SHARDED_DIR, model, optimizer)
    if rank == 0:
        sharding.save_model_config(model, tokenizer, ckpt / sharding.CONFIG_DIR)
    norms.append(_step(model, optimizer, rows, params, clip, sharding.no_sync, world))
    sharding.save_full(model, tokenizer, out / "full", is_main=rank == 0)
    probe = _rows(model.config.vocab_size)[:2, :6]
    with sharding.gathered(model):
        with sharding.head_kept(model):  # nested: its exit must not free what gathered() still holds
            model(input_ids=probe)
        held = not any(type(p).__name__ == "DTensor" for p in model.parameters())
        assert held, "head_kept inside gathered freed the units: the uneven decode below would hang"
        for _ in range(2 + 3 * rank):  # rank 1 decodes longer: no collective may run per forward
            logits = model(input_ids=probe).logits
    freed = all(type(p).__name__ == "DTensor" for p in model.parameters())
    samples = _sample(model, 1 + 2 * rank)  # rank 1 samples 3 prompts one at a time, rank 0 one
    # π_ref beside a sharded policy: the starting weights read again and sharded like it
    reference = setup_reference(model, _cfg(), str(model_dir), policy_trained=False)
    ref_logps = reference.sequence_logps(probe, *_masks(probe))
    report = {"norms": norms, "logits": logits.tolist(), "samples": samples, "ref_logps": ref_logps.tolist()}
    report["ref_sharded"] = sharding.is_sharded(reference.frozen)
    report["nested_hold"] = [held, freed]
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _masks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over every token; the response: all but the first."""
    response = torch.ones_like(ids, dtype=torch.bool)
    response[:, 0] = False
    return torch.ones_like(ids), response


def _cfg():
    from preftune.config import load_config

    return load_config({"method": "dpo", "data": {"train": "unused.jsonl"}})


def _sample(model, n_prompts: int) -> list:
    from preftune.config import GenerationConfig
    from preftune.sampling import sample_ids

    prompts = _rows(model.config.vocab_size)[:n_prompts, :4].tolist()
    gen = GenerationConfig(max_new_tokens=5, batch_size=1)
    return sample_ids(model, prompts, 1, gen, eos_id=None, pad_id=0, seed=0)


def worker_resume(model_dir: Path, out: Path) -> None:
    """1 process: the 2-process checkpoint of step 1 resumed (model and AdamW moments resharded), step 2 over
    the whole batch."""
    from transformers import AutoTokenizer

    from preftune.training import sharding

    model, params, optimizer = _sharded(model_dir, {})
    sharding.load_sharded(out / "ckpt" / sharding.SHARDED_DIR, model, optimizer)
    clip = lambda ps: sharding.clip_grad_norm(ps, CLIP)  # noqa: E731
    norm = _step(model, optimizer, _rows(model.config.vocab_size), params, clip, sharding.no_sync)
    sharding.save_full(model, AutoTokenizer.from_pretrained(model_dir), out / "resumed", is_main=True)
    (out / "resumed.json").write_text(json.dumps({"norm": norm, "chunked": _chunked_head(model_dir, model)}))


def _chunked_head(model_dir: Path, policy) -> dict:
    """The chunked log-softmax (taken above ``CHUNKED_ABOVE``: set to 0) reads the head's weight after the
    forward: on the sharded policy and on a sharded frozen copy (the reference) without gradients, and on the
    policy with them; the log-probs against the unsharded model's, and whether every unit is sharded after."""
    import preftune.logprobs as L
    from preftune.models import load_model
    from preftune.training import sharding

    gathered = sharding.full_state_dict(policy)
    plain = load_model(str(model_dir))
    plain.load_state_dict(gathered)
    reference = sharding.shard_like(load_model(str(model_dir)), policy)
    rows = _rows(policy.config.vocab_size)[:2]
    mask, response = torch.ones_like(rows), torch.zeros_like(rows, dtype=torch.bool)
    response[:, 4:] = True
    was, L.CHUNKED_ABOVE = L.CHUNKED_ABOVE, 0
    try:
        with torch.no_grad():
            want = L.sequence_logps(plain, rows, mask, response)[0]
            start = L.sequence_logps(load_model(str(model_dir)), rows, mask, response)[0]
            no_grad = L.sequence_logps(policy, rows, mask, response)[0]
            ref = L.sequence_logps(reference, rows, mask, response)[0]
        grad = L.sequence_logps(policy, rows, mask, response)[0]
        grad.sum().backward()
    finally:
        L.CHUNKED_ABOVE = was
    units = [u for m in (policy, reference) for u in m.modules() if sharding.is_sharded(u)]
    return {
        "policy_no_grad": float((no_grad - want).abs().max()),
        "policy_grad": float((grad.detach() - want).abs().max()),
        "reference": float((ref - start).abs().max()),
        "all_sharded": all(type(p).__name__ == "DTensor" for u in units for p in u.parameters()),
    }


def worker_lora(model_dir: Path, out: Path) -> None:
    """2 processes, LoRA: adapters and base sharded together, fp32 with CPU offload (exact), then bf16 mixed
    precision over a bf16-stored base (what each forward computes in, what the master weights are)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from preftune.training import sharding

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = {}
    for name, kwargs in {
        "offload": {"cpu_offload": True},
        "bf16": {"mixed_precision": "bf16", "dtype": "bfloat16"},
    }.items():
        model, params, optimizer = _sharded(model_dir, kwargs, lora=True)
        seen: list[str] = []
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        hook = q_proj.lora_A["default"].register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(str(m.weight.dtype))
        )
        clip = lambda ps: sharding.clip_grad_norm(ps, CLIP)  # noqa: E731
        rows = _rows(model.config.vocab_size)[rank::world]
        norm = _step(model, optimizer, rows, params, clip, sharding.no_sync, world)
        hook.remove()
        report[name] = {
            "norm": norm,
            "compute_dtypes": sorted(set(seen)),
            "master_dtypes": sorted({str(p.dtype) for p in params}),
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        }
        sharding.save_full(model, tokenizer, out / name, is_main=rank == 0)
    (out / f"lora{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# --- the tests -----------------------------------------------------------------------------------------


def test_decoder_layers_are_found_by_class_name_under_lora_and_by_fallback(tiny_tokenizer):
    from conftest import build_tiny_model

    from preftune.config import LoraConfig
    from preftune.models import add_lora
    from preftune.training.sharding import decoder_layers

    model = build_tiny_model(tiny_tokenizer)
    assert decoder_layers(model) == list(model.model.layers)
    peft = add_lora(build_tiny_model(tiny_tokenizer), LoraConfig(enabled=True, **LORA))
    layers = decoder_layers(peft)
    assert layers == list(peft.base_model.model.model.layers) and hasattr(
        layers[0].self_attn.q_proj, "lora_A"
    )
    model._no_split_modules = None  # no names: the model.model.layers fallback
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_two_sharded_processes_equal_one_unsharded_then_reshard_to_one_and_export(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from preftune.logprobs import sequence_logps
    from preftune.models import load_model
    from preftune.training.sharding import export

    _torchrun(tmp_path, "blocks", tiny_model_dir, 2)
    after_two, norms = _reference(tiny_model_dir, 2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["norms"] == reports[1]["norms"]  # every rank clips by the same global norm
    assert reports[0]["norms"] == pytest.approx(norms, rel=1e-5)
    assert norms[0] > CLIP and norms[1] > CLIP  # clipping is active: the global norm matters
    final = load_file(tmp_path / "full" / "model.safetensors")
    assert _max_diff(final, after_two.state_dict()) < 1e-5
    with torch.no_grad():
        logits = after_two(input_ids=_rows(after_two.config.vocab_size)[:2, :6]).logits
    for report in reports:  # gathered weights are the whole model on every rank
        assert torch.tensor(report["logits"]) == pytest.approx(logits, abs=1e-5)
    # sampling from the sharded model (a different number of decode passes per rank) draws what it would
    assert (
        reports[1]["samples"] == _sample(after_two, 3) and reports[0]["samples"] == reports[1]["samples"][:1]
    )
    # π_ref: a sharded copy of the starting weights (not of the trained policy)
    assert reports[0]["ref_sharded"] and reports[0]["ref_logps"] == reports[1]["ref_logps"]
    assert all(r["nested_hold"] == [True, True] for r in reports)  # held inside, freed after gathered()
    start = load_model(str(tiny_model_dir)).eval()
    probe = _rows(after_two.config.vocab_size)[:2, :6]
    with torch.no_grad():
        expected = sequence_logps(start, probe, *_masks(probe))[0]
    assert torch.tensor(reports[0]["ref_logps"]) == pytest.approx(expected, abs=1e-5)

    # the step-1 checkpoint of 2 processes, offline in this process: the model after one step
    after_one, _ = _reference(tiny_model_dir, 1)
    export(tmp_path / "ckpt", tmp_path / "exported", log=lambda *a: None)
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert _max_diff(exported, after_one.state_dict()) < 1e-5

    # ... and resumed on 1 process: step 2 there equals step 2 of the 2-process run (AdamW moments resharded)
    _torchrun(tmp_path, "resume", tiny_model_dir, 1)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["norm"] == pytest.approx(norms[1], rel=1e-5)
    chunked = resumed["chunked"]  # the chunked head on sharded models, with and without gradients
    assert max(chunked[k] for k in ("policy_no_grad", "policy_grad", "reference")) < 1e-5
    assert chunked["all_sharded"]
    assert _max_diff(load_file(tmp_path / "resumed" / "model.safetensors"), final) < 1e-5


def test_lora_shards_adapters_with_base_offloads_and_computes_in_bf16(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    _torchrun(tmp_path, "lora", tiny_model_dir, 2)
    reference, norms = _reference(tiny_model_dir, 1, lora=True)
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    reports = [json.loads((tmp_path / f"lora{r}.json").read_text()) for r in (0, 1)]
    for name in ("offload", "bf16"):
        assert reports[0][name]["norm"] == reports[1][name]["norm"]
        assert reports[0][name]["sharded"]  # adapters and base: every parameter is a shard
        assert reports[0][name]["master_dtypes"] == ["torch.float32"]
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        assert len(saved) == len(expected) == 8  # the adapter whole: lora_A and lora_B of q, v in 2 layers
        renamed = {k.replace(".default", ""): v for k, v in expected.items()}
        assert sorted(saved) == sorted(renamed)
        tolerance = 1e-5 if name == "offload" else 2e-3  # fp32 is exact; bf16 compute rounds (5e-4 seen)
        assert _max_diff(saved, renamed) < tolerance
    assert reports[0]["offload"]["compute_dtypes"] == ["torch.float32"]
    assert reports[0]["offload"]["norm"] == pytest.approx(norms[0], rel=1e-5)
    assert reports[0]["bf16"]["compute_dtypes"] == ["torch.bfloat16"]  # all-gathered in bf16
    assert reports[0]["bf16"]["norm"] == pytest.approx(norms[0], rel=2e-2)


# --- training runs under training.sharding: fsdp (the CLI under torchrun, as the README launches it) ----------

CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
LAUNCH2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
CLI = [sys.executable, "-m", "preftune.cli"]


def _cli(cmd: list, tmp_path: Path, *args, expect: int = 0, cpu: bool = True) -> str:
    """Run ``cmd train|export ...`` with 1-thread CPU processes (``tmp_path`` on PYTHONPATH: reward modules;
    ``cpu=False``: on the GPUs, one per process)."""
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **(CPU_ENV if cpu else {"OMP_NUM_THREADS": "1"}), "PYTHONPATH": path}
    if not cpu:
        env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def _write_config(tmp_path: Path, name: str, raw: dict) -> Path:
    import yaml

    raw = {**raw, "training": {**raw["training"], "output_dir": str(tmp_path / name), "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(folder: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(folder / name)


def _dpo(model_dir: Path, data: Path, sharding: str, batch_size: int, **extra) -> dict:
    return {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir), **extra.get("model", {})},
        "data": {"train": str(data), "max_length": 48, "max_prompt_length": 24},
        "training": {
            "batch_size": batch_size, "grad_accum": 2, "max_steps": 3, "learning_rate": 1e-3,
            "save_every": 1, "sharding": sharding, **extra.get("training", {}),
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tiny_model_dir):
    """7 pairs, accumulation 2 (the second micro-batch splits 2 + 1 over the ranks): DPO under fsdp on 2
    processes × 2 pairs, and unsharded on 1 process × 4 pairs; checkpoints after steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("dpo-fsdp")
    data = tmp / "pairs.jsonl"
    rows = [
        {"prompt": f"The movie {i} was", "chosen": " great and fun.", "rejected": " dull."} for i in range(7)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli(LAUNCH2, tmp, "train", _write_config(tmp, "two", _dpo(tiny_model_dir, data, "fsdp", 2)))
    _cli(CLI, tmp, "train", _write_config(tmp, "one", _dpo(tiny_model_dir, data, "none", 4)))
    # every decoder layer kept gathered from forward to backward, with evaluations (forwards no backward
    # follows) before each checkpoint
    keep = _dpo(tiny_model_dir, data, "fsdp", 2, training={"reshard_after_forward": False, "eval_every": 1})
    _cli(
        LAUNCH2,
        tmp,
        "train",
        _write_config(tmp, "keep", {**keep, "data": {**keep["data"], "eval": str(data)}}),
    )
    return tmp


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_under_fsdp_on_two_processes_equals_one_process_and_exports_its_checkpoints(dpo_runs):
    two, one = dpo_runs / "two", dpo_runs / "one"
    assert _max_diff(_weights(two / "model"), _weights(one / "model")) < 1e-5
    for r2, r1 in zip(_metrics(two), _metrics(one), strict=True):
        assert r2["examples"] == r1["examples"]
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-6)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)
    ckpt = two / "checkpoints" / "step-0000002"
    assert (ckpt / "sharded" / ".metadata").is_file() and (ckpt / "model_config" / "config.json").is_file()
    assert (
        not (ckpt / "model").exists() and not (ckpt / "optimizer.pt").exists()
    )  # no full copy per checkpoint
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["sharding"] == "fsdp"
    # offline, in one process: the model of the run at step 2 (the unsharded run's checkpoint holds it whole)
    _cli(CLI, dpo_runs, "export", ckpt, dpo_runs / "exported")
    expected = _weights(one / "checkpoints" / "step-0000002" / "model")
    assert _max_diff(_weights(dpo_runs / "exported"), expected) < 1e-5
    assert _max_diff(expected, _weights(one / "model")) > 1e-4  # step 2 is not the final model
    out = _cli(CLI, dpo_runs, "export", one / "checkpoints" / "step-0000002", dpo_runs / "x", expect=2)
    assert "is not a sharded checkpoint" in out


def test_layers_kept_gathered_until_the_backward_take_the_same_steps(dpo_runs):
    """``training.reshard_after_forward: false`` (ZeRO-2's memory, one all-gather fewer per layer): the same
    steps as one process, and the evaluations' no-gradient forwards leave every unit sharded again (the
    checkpoints after them are written and export to the same weights)."""
    keep, one = dpo_runs / "keep", dpo_runs / "one"
    assert _max_diff(_weights(keep / "model"), _weights(one / "model")) < 1e-5
    train = [r for r in _metrics(keep) if r["split"] == "train"]
    for r2, r1 in zip(train, _metrics(one), strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-6)
    assert [r["step"] for r in _metrics(keep) if r["split"] == "eval"] == [1, 2, 3]
    _cli(CLI, dpo_runs, "export", keep / "checkpoints" / "step-0000002", dpo_runs / "keep-exported")
    expected = _weights(one / "checkpoints" / "step-0000002" / "model")
    assert _max_diff(_weights(dpo_runs / "keep-exported"), expected) < 1e-5


def _killed_copy(run: Path, name: str) -> Path:
    """``run`` as a kill -9 during step 3 would leave it: checkpoints of steps 1 and 2, a torn temporary
    checkpoint folder, no final model."""
    import shutil

    copy = run.parent / name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    (copy / "result.json").unlink()
    torn = copy / "checkpoints" / ".step-0000003.tmp" / "sharded"
    torn.mkdir(parents=True)
    (torn / "__0_0.distcp").write_bytes(b"torn")
    return copy


def test_kill_after_a_sharded_checkpoint_then_resume_equals_uninterrupted(dpo_runs, tiny_model_dir):
    killed = _killed_copy(dpo_runs / "two", "killed")
    config = _write_config(dpo_runs, "killed", _dpo(tiny_model_dir, dpo_runs / "pairs.jsonl", "fsdp", 2))
    out = _cli(LAUNCH2, dpo_runs, "train", config, "--resume")
    assert "resumed from" in out and "step-0000002 at step 2/3" in out
    assert _max_diff(_weights(killed / "model"), _weights(dpo_runs / "two" / "model")) < 1e-7
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]


def test_a_two_process_sharded_checkpoint_resumes_on_one_process(dpo_runs, tiny_model_dir):
    killed = _killed_copy(dpo_runs / "two", "on_one")
    config = _write_config(dpo_runs, "on_one", _dpo(tiny_model_dir, dpo_runs / "pairs.jsonl", "fsdp", 2))
    out = _cli(CLI, dpo_runs, "train", config, "--resume", expect=2)  # 1 × 2 × 2 pairs: another global batch
    assert "2 process(es) × batch_size 2 × grad_accum 2 = 8 examples per step" in out
    assert "Set training.batch_size=4" in out
    out = _cli(CLI, dpo_runs, "train", config, "--resume", "training.batch_size=4", "--allow-change",
               "training.batch_size")  # fmt: skip
    assert "resuming a checkpoint of 2 process(es) on 1" in out
    assert _max_diff(_weights(killed / "model"), _weights(dpo_runs / "two" / "model")) < 1e-5


def _online(method: str, model_dir: Path, prompts: Path, sharding: str) -> dict:
    section = {  # grpo: π_ref a sharded copy (β > 0); ppo: 2 updates per batch (a mid-batch checkpoint)
        "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 4, "beta": 0.05},
        "ppo": {"prompts_per_batch": 4, "epochs": 2, "minibatches": 1, "beta": 0.05},
    }[method]
    return {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "eval": str(prompts.parent / "held_out.jsonl"), "max_length": 48,
                 "max_prompt_length": 24},  # fmt: skip
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {
            "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "save_every": 1, "sharding": sharding,
            "gradient_checkpointing": method == "grpo",
        },
        method: {**section, "rewards": ["fsdp_rewards:by_ids"], "eval_samples_per_prompt": 1},
    }  # fmt: skip


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_methods_train_under_fsdp_and_save_a_loadable_model(tmp_path, tiny_model_dir, method):
    """2 processes sample from gathered weights (rank 0 and rank 1 decode different lengths), score, train
    2 steps on shards (GRPO with gradient checkpointing; PPO's value head beside the shards in the optimizer,
    its state in the sharded checkpoint) and evaluate against a sharded π_ref copy: the same steps as one
    unsharded process."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(8)))
    held_out = "".join(json.dumps({"prompt": f"The film {i} is"}) + "\n" for i in range(3))
    (tmp_path / "held_out.jsonl").write_text(held_out)
    (tmp_path / "fsdp_rewards.py").write_text(
        "def by_ids(prompts, completions, completion_ids):\n"
        "    return [float(sum(ids) % 7) for ids in completion_ids]\n"
    )
    _cli(
        LAUNCH2,
        tmp_path,
        "train",
        _write_config(tmp_path, "two", _online(method, tiny_model_dir, prompts, "fsdp")),
    )
    _cli(
        CLI,
        tmp_path,
        "train",
        _write_config(tmp_path, "one", _online(method, tiny_model_dir, prompts, "none")),
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    assert (
        _max_diff(
            loaded.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
        )
        < 1e-5
    )
    assert _max_diff(_weights(tmp_path / "two" / "model"), _weights(tiny_model_dir)) > 1e-3  # it trained
    rows = [_metrics(tmp_path / n) for n in ("two", "one")]
    assert [r["split"] for r in rows[0]] == ["eval", "train", "train", "eval"]
    for r2, r1 in zip(*rows, strict=True):
        assert r2.get("reward") == pytest.approx(r1.get("reward"), abs=1e-6)
        assert r2.get("kl", 0.0) == pytest.approx(r1.get("kl", 0.0), abs=1e-5)
        assert r2.get("grad_norm", 0.0) == pytest.approx(r1.get("grad_norm", 0.0), rel=1e-5)
    if method == "ppo":  # mid-batch checkpoint: each process's samples, the value head's AdamW state sharded
        ckpt = tmp_path / "two" / "checkpoints" / "step-0000001"
        assert (ckpt / "rollout-0.json").is_file() and (ckpt / "rollout-1.json").is_file()
        head = _weights(tmp_path / "two", "value_head.safetensors")
        assert _max_diff(head, _weights(tmp_path / "one", "value_head.safetensors")) < 1e-5


def test_lora_under_fsdp_over_a_bf16_base_saves_the_adapter_whole_and_merges(dpo_runs, tiny_model_dir):
    """LoRA over a bf16-stored base (fp32 adapters in the same units), the reference on every batch
    (adapters off): adapters and base sharded together; the final adapter (every LoRA matrix, gathered) and the
    merged model equal the unsharded run's. (bf16 compute: test_lora_shards_adapters_with_base_...)"""
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"], "merge": True}
    extra = {
        "model": {"lora": lora, "dtype": "bfloat16"},
        "training": {"precompute_ref": False, "save_every": 0},
    }
    data = dpo_runs / "pairs.jsonl"
    _cli(
        LAUNCH2,
        dpo_runs,
        "train",
        _write_config(dpo_runs, "lora2", _dpo(tiny_model_dir, data, "fsdp", 2, **extra)),
    )
    _cli(
        CLI,
        dpo_runs,
        "train",
        _write_config(dpo_runs, "lora1", _dpo(tiny_model_dir, data, "none", 4, **extra)),
    )
    name = "adapter_model.safetensors"
    two, one = _weights(dpo_runs / "lora2" / "model", name), _weights(dpo_runs / "lora1" / "model", name)
    assert len(two) == 8 and all("lora_" in k for k in two)  # A and B of q and v in both layers
    assert _max_diff(two, one) < 1e-6
    assert max(float(v.abs().max()) for k, v in two.items() if "lora_B" in k) > 1e-3  # it trained
    merged = _weights(dpo_runs / "lora2" / "model_merged")
    assert _max_diff(merged, _weights(dpo_runs / "lora1" / "model_merged")) == 0.0  # bf16, as stored
    assert (dpo_runs / "lora2" / "model_merged" / "adapter" / name).is_file()


def test_full_fine_tuning_in_bf16_under_fsdp_trains_from_ln2(dpo_runs, tiny_model_dir):
    """``mixed_precision: bf16`` over fp32 master weights (FSDP2 gathers bf16 copies): the response-only head
    casts its input to the gathered weight's dtype, not the fp32 shard's (it failed with ``expected m1 and m2
    to have the same dtype``); the first step's loss is ln 2 (policy = reference, both the sharded policy in
    bf16), the loss falls, and the saved weights are fp32."""
    extra = {"training": {"mixed_precision": "bf16", "save_every": 0, "learning_rate": 1e-2}}
    config = _write_config(
        dpo_runs, "bf16", _dpo(tiny_model_dir, dpo_runs / "pairs.jsonl", "fsdp", 4, **extra)
    )
    _cli(CLI, dpo_runs, "train", config)
    losses = [r["loss"] for r in _metrics(dpo_runs / "bf16")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.05
    trained = _weights(dpo_runs / "bf16" / "model")
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert _max_diff(trained, _weights(tiny_model_dir)) > 1e-3


# --- GPUs (NCCL): skipped without them; run with python -m pytest -m gpu tests/test_sharding.py ----------------

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@no_cuda
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fsdp_on_one_gpu_equals_unsharded(tmp_path, tiny_model_dir, mixed_precision):
    """FSDP2 on one GPU (a 1-process NCCL group) against the unsharded run: fp32 equal; bf16 within bf16
    (FSDP casts the weights to bf16 for compute, autocast the matmul inputs: norms and the head round
    differently)."""
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"The movie {i} was", "chosen": " great and fun.", "rejected": " dull."} for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"training": {"mixed_precision": mixed_precision}}
    for name, sharding in (("fsdp", "fsdp"), ("plain", "none")):
        config = _write_config(tmp_path, name, _dpo(tiny_model_dir, data, sharding, 4, **extra))
        _cli(CLI, tmp_path, "train", config, cpu=False)
    tolerance = 1e-5 if mixed_precision == "no" else 5e-3
    assert (
        _max_diff(_weights(tmp_path / "fsdp" / "model"), _weights(tmp_path / "plain" / "model")) < tolerance
    )
    _cli(CLI, tmp_path, "export", tmp_path / "fsdp" / "checkpoints" / "step-0000002", tmp_path / "exported")


@pytest.mark.gpu
@no_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_bf16_on_two_gpus_equals_one_gpu(tmp_path, tiny_model_dir):
    """NCCL, bf16 compute with fp32 master weights and reduction: 2 GPUs × 2 pairs take the steps of 1 GPU ×
    4 pairs (bf16 gradients of other micro-batches round differently: within bf16's reach), and a 2-GPU
    checkpoint resumes on 1 GPU."""
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"The movie {i} was", "chosen": " great and fun.", "rejected": " dull."} for i in range(7)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"training": {"mixed_precision": "bf16", "cpu_offload": True}}
    _cli(
        LAUNCH2,
        tmp_path,
        "train",
        _write_config(tmp_path, "two", _dpo(tiny_model_dir, data, "fsdp", 2, **extra)),
        cpu=False,
    )
    _cli(
        CLI,
        tmp_path,
        "train",
        _write_config(tmp_path, "one", _dpo(tiny_model_dir, data, "fsdp", 4, **extra)),
        cpu=False,
    )
    assert _max_diff(_weights(tmp_path / "two" / "model"), _weights(tmp_path / "one" / "model")) < 2e-3
    for r2, r1 in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"), strict=True):
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=2e-2)
    killed = _killed_copy(tmp_path / "two", "on_one")
    config = _write_config(tmp_path, "on_one", _dpo(tiny_model_dir, data, "fsdp", 4, **extra))
    out = _cli(CLI, tmp_path, "train", config, "--resume", "--allow-change", "training.batch_size", cpu=False)
    assert "resuming a checkpoint of 2 process(es) on 1" in out
    assert _max_diff(_weights(killed / "model"), _weights(tmp_path / "two" / "model")) < 2e-3


if __name__ == "__main__":
    torch.set_num_threads(1)
    case, model_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"blocks": worker_blocks, "resume": worker_resume, "lora": worker_lora}[case](model_dir, out)
