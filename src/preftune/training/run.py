"""From a config to a trained model: prepare (data, model, checks) -> fit -> save.

``prepare`` does everything that can fail on bad input — config, every record, tokenisation, ODPO's
score domain, the model — before any training starts; ``preftune validate`` runs it alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import REFERENCE_FREE, TrainConfig, dump_yaml
from ..data import DataError, PairExample, TokenizeStats, load_rows, split_rows, tokenize_rows, validate_rows
from ..losses import OffsetDomainError, odpo_offset
from ..models import add_lora, load_model, load_tokenizer, resolve_model_path, save_model
from .checkpoint import latest_checkpoint
from .families import PairFamily, RewardModelFamily
from .loop import StepPlan, evaluate, fit, total_steps


class RunDirError(RuntimeError):
    """The run directory exists and neither --resume nor --overwrite was given."""


@dataclass
class Prepared:
    cfg: TrainConfig
    model_path: str
    tokenizer: object
    examples: dict[str, list[PairExample]]
    stats: dict[str, TokenizeStats]
    sources: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict:
        t = self.cfg.training
        plan = StepPlan(len(self.examples["train"]), t.batch_size, t.grad_accum, t.seed)
        return {
            "method": self.cfg.method,
            "model": self.model_path,
            "lora": self.cfg.model.lora.enabled,
            "train_pairs": len(self.examples["train"]),
            "eval_pairs": len(self.examples.get("eval", [])),
            "tokenize": {k: vars(v) for k, v in self.stats.items()},
            "optimizer_steps": total_steps(self.cfg, plan),
            "steps_per_epoch": plan.steps_per_epoch,
            "pairs_per_step": t.batch_size * t.grad_accum,
        }


def _load_split_rows(cfg: TrainConfig) -> dict[str, list[dict]]:
    d = cfg.data
    columns = {k: v for k, v in vars(d.columns).items()}
    train = load_rows(d.train, columns=columns, split=d.split)
    if d.eval:
        return {"train": train, "eval": load_rows(d.eval, columns=columns, split=d.split)}
    if d.eval_fraction > 0:
        train, held = split_rows(train, eval_fraction=d.eval_fraction, seed=cfg.training.seed)
        return {"train": train, "eval": held}
    return {"train": train}


def _check_odpo_scores(cfg: TrainConfig, examples: list[PairExample], split: str) -> None:
    s_w = torch.tensor([e.score_chosen for e in examples], dtype=torch.float64)
    s_l = torch.tensor([e.score_rejected for e in examples], dtype=torch.float64)
    try:
        odpo_offset(s_w, s_l, alpha=cfg.odpo.alpha, offset=cfg.odpo.offset)
    except OffsetDomainError as exc:
        bad = [examples[i].source for i in exc.rows]
        where = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(
            f"{split} data: ODPO offset {cfg.odpo.offset!r} undefined for {where}: {exc}"
        ) from None


def prepare(cfg: TrainConfig, log=print) -> Prepared:
    """Load and check all data and the tokenizer; raise before training on anything bad."""
    rows = _load_split_rows(cfg)
    for split, split_rows_ in rows.items():
        if not split_rows_:
            raise DataError(
                f"{split} data ({cfg.data.train if split == 'train' else cfg.data.eval}) has no records"
            )
        has_margin = cfg.method == "reward_model" and cfg.reward_model.use_margin
        has_margin = has_margin and any(r.get("margin") is not None for r in split_rows_)
        # a margin in some rows only would be used in some batches only: all rows or none
        validate_rows(split_rows_, require_scores=cfg.method == "odpo", require_margin=has_margin)
    model_path = resolve_model_path(cfg.model.name_or_path, log)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    examples, stats = {}, {}
    for split, split_rows_ in rows.items():
        examples[split], stats[split] = tokenize_rows(
            split_rows_,
            tokenizer,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        if not examples[split]:
            raise DataError(f"{split} data: every pair was dropped by tokenisation ({vars(stats[split])})")
        if cfg.method == "odpo":
            _check_odpo_scores(cfg, examples[split], split)
    return Prepared(cfg, model_path, tokenizer, examples, stats)


def check_run_dir(
    run_dir: Path, *, resume: bool, overwrite: bool, cfg: TrainConfig | None = None
) -> Path | None:
    """Read-only checks of the run directory (every process runs them, so all fail alike); returns the
    checkpoint to resume from, or None."""
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunDirError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
        if cfg is not None:
            _check_resume_config(run_dir / "config.yaml", cfg)
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


# keys that may change between an interrupted run and its resumption (length, display, bookkeeping)
_RESUMABLE_KEYS = {
    "max_steps",
    "epochs",
    "progress",
    "report_to",
    "save_every",
    "eval_every",
    "keep_checkpoints",
    "log_every",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resume_config(saved_path: Path, cfg: TrainConfig) -> None:
    """A resumed run must replay the same data, model and optimizer settings as the interrupted one."""
    import yaml

    if not saved_path.is_file():
        raise RunDirError(f"--resume: {saved_path} is missing")
    saved, now = _flatten(yaml.safe_load(saved_path.read_text())), _flatten(cfg.to_dict())
    ignore = {f"training.{key}" for key in _RESUMABLE_KEYS}
    diff = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if diff:
        raise RunDirError(
            f"--resume: the config differs from the interrupted run's ({saved_path}) in {', '.join(diff)}"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build_model(cfg: TrainConfig, prep: Prepared, resume_from: Path | None):
    is_rm = cfg.method == "reward_model"
    source = prep.model_path
    if resume_from is not None and not cfg.model.lora.enabled:
        source = str(resume_from / "model")
    model = load_model(
        source,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        disable_dropout=cfg.model.disable_dropout,
        sequence_classification=is_rm,
        pad_token_id=prep.tokenizer.pad_token_id,
    )
    if cfg.model.lora.enabled:
        task = "SEQ_CLS" if is_rm else "CAUSAL_LM"
        if resume_from is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, resume_from / "model", is_trainable=True)
        else:
            model = add_lora(model, cfg.model.lora, task_type=task)
    return model


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step_end: Callable[[int, dict], None] | None = None,
    ref_logps_file: Path | None = None,
    log=print,
) -> Path:
    """Train per ``cfg``; returns the run directory (final model in ``<run_dir>/model``).

    ``ref_logps_file``: reference log-probs already computed for exactly this data and starting model
    (the experiment shares one across its runs); it is copied into the run directory and used as is.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    prep = prepare(cfg, log)
    run_dir = Path(cfg.training.output_dir)
    accelerator = Accelerator(log_with=cfg.training.report_to or None, project_dir=str(run_dir))
    main = accelerator.is_main_process
    resume_from = check_run_dir(run_dir, resume=resume, overwrite=overwrite, cfg=cfg)  # every process
    accelerator.wait_for_everyone()  # all have checked before the main process changes anything
    summary = prep.summary()
    if main:
        if resume_from is None:
            create_run_dir(run_dir, overwrite=overwrite)
        log(json.dumps(summary, indent=2))
        _write_atomic(run_dir / "config.yaml", dump_yaml(cfg.to_dict()))
        _write_atomic(run_dir / "data_summary.json", json.dumps(summary, indent=2))
        if ref_logps_file is not None and resume_from is None and cfg.method not in REFERENCE_FREE:
            shutil.copyfile(ref_logps_file, run_dir / "ref_logps.safetensors")
    accelerator.wait_for_everyone()

    set_seed(cfg.training.seed)
    if cfg.training.report_to:
        accelerator.init_trackers(run_dir.name, config=json.loads(json.dumps(cfg.to_dict(), default=str)))
    model = _build_model(cfg, prep, resume_from).to(accelerator.device)
    device = accelerator.device

    if cfg.method == "reward_model":
        family = RewardModelFamily(
            cfg, prep.examples, prep.tokenizer.pad_token_id, prep.tokenizer.eos_token_id, device
        )
    else:
        family = PairFamily(cfg, prep.examples, prep.tokenizer.pad_token_id, device)
        if family.needs_ref:
            _setup_reference(cfg, prep, family, model, run_dir, resume_from, log, save=main)
        accelerator.wait_for_everyone()  # every process has read or computed the reference before it is written

    eval_fn = None
    if "eval" in prep.examples:
        n_eval = len(prep.examples["eval"])

        def eval_fn(m):
            return evaluate(
                m,
                family.compute,
                lambda idx: family.make_batch("eval", idx),
                n_eval,
                cfg.training.eval_batch_size,
            )

    started = time.time()
    last = fit(
        cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=prep.tokenizer,
        n_train=len(prep.examples["train"]),
        make_batch=lambda idx: family.make_batch("train", idx),
        compute=family.compute,
        run_dir=run_dir,
        resume_from=resume_from,
        eval_fn=eval_fn,
        on_step_end=on_step_end,
        log=log,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        save_model(final, prep.tokenizer, run_dir / "model")
        if cfg.model.lora.enabled and cfg.model.lora.merge:
            save_model(final, prep.tokenizer, run_dir / "model_merged", merge_lora=True)
        result = {"final_train_metrics": last, "train_seconds": time.time() - started, **summary}
        _write_atomic(run_dir / "result.json", json.dumps(result, indent=2))
        log(f"saved {run_dir / 'model'}")
    accelerator.end_training()
    return run_dir


def _setup_reference(
    cfg, prep, family: PairFamily, model, run_dir: Path, resume_from, log, save: bool = True
) -> None:
    """Precomputed reference log-probs (cached in the run dir for resume), or an on-the-fly reference."""
    from safetensors.torch import load_file, save_file

    cache = run_dir / "ref_logps.safetensors"
    if not cfg.training.precompute_ref:
        if not cfg.model.lora.enabled:  # full fine-tuning: a frozen copy of the starting weights
            ref = model if resume_from is None else None
            ref = (
                copy.deepcopy(ref)
                if ref is not None
                else load_model(
                    prep.model_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
                )
            )
            family.ref_model = ref.to(next(model.parameters()).device).eval().requires_grad_(False)
        return
    if cache.is_file():
        family.ref = load_file(cache)
        for split, examples in prep.examples.items():
            if split not in family.ref or family.ref[split].shape != (len(examples), 2):
                raise RuntimeError(
                    f"{cache} does not match the data ({split}: {len(examples)} pairs); delete it"
                )
        return
    if resume_from is not None and not cfg.model.lora.enabled:
        raise RuntimeError(f"{cache} is missing: cannot rebuild reference log-probs from a trained policy")
    started = time.time()
    n = sum(len(v) for v in prep.examples.values())
    family.precompute_reference(model, cfg.training.eval_batch_size)
    if not save:
        return
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file({k: v.contiguous() for k, v in family.ref.items()}, tmp)
    os.replace(tmp, cache)
    log(f"reference log-probs for {n} pairs in {time.time() - started:.1f}s (cached in {cache})")


def validate(cfg: TrainConfig, *, load_weights: bool = True, log=print) -> dict:
    """Everything ``train`` checks, without training: returns the summary that would be trained."""
    prep = prepare(cfg, log)
    summary = prep.summary()
    if load_weights:
        model = _build_model(cfg, prep, None)
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary["reference"] = (
            "none"
            if cfg.method in REFERENCE_FREE
            else "adapters disabled"
            if cfg.model.lora.enabled
            else "frozen copy"
        )
    return summary
