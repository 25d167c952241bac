"""The run directory: refuse to overwrite it silently, create it, and check that a resumed run replays the
interrupted run's settings.

A run directory may move (to a bigger disk after a failed write, to another node): ``training.output_dir``
says where the run lives now, it is not a setting to replay, so ``--resume`` continues the run where it is
found and the rewritten ``config.yaml`` names its new place. Nothing inside the run directory records its
own path (checkpoints, metrics and the reference cache are addressed relative to it)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from ..config import TrainConfig
from .checkpoint import latest_checkpoint


class RunDirError(RuntimeError):
    """The run directory exists and neither --resume nor --overwrite was given (or cannot be resumed)."""


def check_run_dir(
    run_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    cfg: TrainConfig | None = None,
    allow_changes: frozenset[str] = frozenset(),
) -> Path | None:
    """Read-only checks of the run directory (every process runs them, so all fail alike); returns the
    checkpoint to resume from, or None."""
    if resume:
        if (run_dir / "result.json").is_file() and (run_dir / "model").is_dir():
            raise RunDirError(
                f"--resume: the run in {run_dir} is complete (model/ and result.json are there); nothing to "
                "resume. To train further, start a new run from its model (model.name_or_path)"
            )
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunDirError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
        if cfg is not None:
            _check_resume_config(run_dir / "config.yaml", cfg, allow_changes)
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists; pass --resume to continue it, "
            "--overwrite to replace it, or set training.output_dir to a new folder"
        )
    return None


def create_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Create (with ``overwrite``: empty) the run directory; the main process's job."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


# keys that may change between an interrupted run and its resumption: display and bookkeeping only
_RESUMABLE_KEYS = {
    "progress",
    "report_to",
    "save_every",
    "eval_every",
    "keep_checkpoints",
    "log_every",
    "skip_nonfinite",
    "ref_cache",
    "reshard_after_forward",  # memory against speed under fsdp: the same steps
}
# keys whose change moves the learning rate of every remaining step
_SCHEDULE_KEYS = {
    f"training.{key}" for key in ("max_steps", "epochs", "lr_scheduler", "warmup_steps", "learning_rate")
} | {"training.batch_size", "training.grad_accum"}  # (steps per epoch)
# where the run lives, not how it trains: a moved run directory resumes where it now is
_LOCATION_KEYS = {"training.output_dir"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolved(saved: dict) -> dict:
    """A saved config with its method's unset keys filled in (``TrainConfig.to_dict(resolved=True)``): what it
    trains, as a run saved by any version wrote it (an earlier one wrote GRPO's clip range resolved, this one
    null); as read if it no longer builds."""
    from ..config import ConfigError, train_config_from_dict

    try:
        with warnings.catch_warnings():  # a renamed key was announced when the run started
            warnings.simplefilter("ignore")
            return train_config_from_dict(saved).to_dict(resolved=True)
    except (ConfigError, TypeError, ValueError):
        return saved


def _check_resume_config(saved_path: Path, cfg: TrainConfig, allow: frozenset[str] = frozenset()) -> None:
    """A resumed run must replay the same data, model, optimizer and schedule as the interrupted one.

    Changing the length (``max_steps``, ``epochs``) or the schedule changes the learning rate of every
    remaining step, so it is refused unless the key is named in ``allow`` (``--allow-change KEY``).
    ``training.output_dir`` may always differ: the run directory was moved.
    """
    import yaml

    if not saved_path.is_file():
        raise RunDirError(f"--resume: {saved_path} is missing")
    saved = _flatten(_resolved(yaml.safe_load(saved_path.read_text())))
    now = _flatten(cfg.to_dict(resolved=True))
    unknown = sorted(set(allow) - set(now))
    if unknown:
        raise RunDirError(
            f"--allow-change: unknown key(s) {', '.join(unknown)} (use dotted keys: training.max_steps)"
        )
    ignore = {f"training.{key}" for key in _RESUMABLE_KEYS} | _LOCATION_KEYS | set(allow)
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        changes = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in diff)
        schedule = [k for k in diff if k in _SCHEDULE_KEYS]
        why = (
            f" (with {', '.join(schedule)} the learning-rate schedule of the remaining steps changes)"
            if schedule
            else ""
        )
        raise RunDirError(
            f"--resume: the config differs from the interrupted run's ({saved_path}) in {changes}. A resumed run "
            f"must replay the same settings; to continue with a new value on purpose{why}, pass "
            + " ".join(f"--allow-change {k}" for k in diff)
        )
