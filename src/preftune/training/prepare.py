"""Offline data preparation: everything about pair data that can fail on bad input — every record, the
tokenisation, ODPO's score domain — checked before any training starts (``preftune validate`` runs it alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data import DataError, PairExample, TokenizeStats, load_rows, split_rows, tokenize_rows, validate_rows
from ..losses import OffsetDomainError, odpo_offset
from ..models import load_tokenizer, resolve_model_path
from .loop import StepPlan, total_steps


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
