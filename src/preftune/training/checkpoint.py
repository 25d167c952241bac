"""Checkpoints in one format: ``checkpoints/step-NNNNNNN/`` holding ``model/`` (the standard
save_pretrained folder, or the LoRA adapter), ``optimizer.pt``, ``scheduler.pt`` and, under fp16 loss scaling, ``scaler.pt`` (plain tensor dicts,
loaded with ``weights_only=True``), ``rng.safetensors`` and ``trainer_state.json``. Each is written to a
temporary folder and renamed (:func:`preftune.files.atomic_dir`), so a checkpoint either exists whole or not
at all; older checkpoints are rotated out only after the new one is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_dir
from ..models import save_model

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    scaler=None,
    extra=None,
) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(final) as tmp:  # a failed write leaves no partial folder and the older checkpoints intact
        save_model(model, tokenizer, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:  # fp16 loss scaling: the scale and its growth tracker
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        save_file(_rng_state(), tmp / "rng.safetensors")
        if extra is not None:
            extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(ckpt: Path, *, optimizer, scheduler, scaler=None) -> dict:
    """Restore optimizer, scheduler and RNG from ``ckpt``; returns the trainer state (``step`` etc.).

    The model weights are loaded by the caller from ``ckpt / "model"`` through the model-loading path.
    """
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if scaler is not None and (ckpt / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    _set_rng_state(load_file(ckpt / "rng.safetensors"))
    return json.loads((ckpt / STATE_FILE).read_text())
