"""Data preparation: everything that can fail on bad input, checked before any training starts
(``preftune validate`` runs it alone). Pair data: every record, the tokenisation, ODPO's score domain.
Prompt data (online methods): every prompt, the tokenisation, and the reward functions (a missing module,
function or reward-model folder is an error here, not after the first samples).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, TrainConfig
from ..data import (
    DataError,
    PairExample,
    TokenizeStats,
    UnpairedExample,
    check_labels,
    is_unpaired,
    load_rows,
    pairs_to_unpaired,
    split_rows,
    token_cache,
    tokenize_rows,
    tokenize_unpaired_rows,
)
from ..data.checks import pair_problems, raise_problems
from ..data.prompts import PromptExample, PromptStats, tokenize_prompts, validate_prompt_rows
from ..data.unpaired import unpaired_problems
from ..losses import OffsetDomainError, odpo_offset
from ..models import load_tokenizer, resolve_model_path
from ..rewards import RewardFunction, load_reward
from .loop import StepPlan, total_steps


@dataclass
class Prepared:
    cfg: TrainConfig
    model_path: str
    tokenizer: object
    examples: dict[str, list[PairExample]] | dict[str, list[UnpairedExample]]  # unpaired: kto
    stats: dict[str, TokenizeStats]
    sources: dict[str, list[str]] = field(default_factory=dict)

    def summary(self, num_processes: int = 1) -> dict:
        """What training would do with ``num_processes`` processes (each takes ``batch_size`` pairs)."""
        t = self.cfg.training
        plan = StepPlan(
            len(self.examples["train"]), t.batch_size, t.grad_accum, t.seed, num_processes
        )  # no sort needed
        unpaired = self.cfg.method_config.kind == "unpaired"
        per_step = "records_per_step" if unpaired else "pairs_per_step"
        if unpaired:  # records, not pairs
            train = self.examples["train"]
            counts = {
                "train_records": len(train),
                "eval_records": len(self.examples.get("eval", [])),
                "train_desirable": sum(e.label for e in train),
                "train_undesirable": sum(not e.label for e in train),
                "reference": "on the fly (adapters disabled)"
                if self.cfg.model.lora.enabled
                else "on the fly (frozen copy)",
            }
        else:
            counts = {
                "train_pairs": len(self.examples["train"]),
                "eval_pairs": len(self.examples.get("eval", [])),
            }
        return {
            "method": self.cfg.method,
            "model": self.model_path,
            "lora": self.cfg.model.lora.enabled,
            **counts,
            "tokenize": {k: vars(v) for k, v in self.stats.items()},
            "processes": num_processes,
            "optimizer_steps": total_steps(self.cfg, plan),
            "steps_per_epoch": plan.steps_per_epoch,
            per_step: t.batch_size * t.grad_accum * num_processes,
        }


@dataclass
class PreparedPrompts:
    """Checked prompt data, tokenizer and reward functions of an online run."""

    cfg: TrainConfig
    model_path: str
    tokenizer: object
    examples: dict[str, list[PromptExample]]
    stats: dict[str, PromptStats]
    rewards: list[RewardFunction]

    def plan(self, num_processes: int = 1, rank: int = 0) -> StepPlan:
        """Sampling batches over the prompts: each process takes prompts_per_batch / num_processes per batch.

        Every batch is full (``drop_last``): an epoch's last ``n mod prompts_per_batch`` prompts are not
        sampled in it, and since every epoch reshuffles all n prompts they join the next epoch's order (which
        prompts wait changes from epoch to epoch). A short batch would leave a process without prompts (its
        collectives out of step with the others') or a PPO minibatch empty (an optimizer step on nothing)."""
        per_batch = self.cfg.method_config.prompts_per_batch
        check_batch_fits(self.cfg, len(self.examples["train"]))
        for ok, message in self.cfg.method_config.processes_checks(num_processes):
            if not ok:
                raise ConfigError(message)
        per_rank = per_batch // num_processes
        n = len(self.examples["train"])
        return StepPlan(n, per_rank, 1, self.cfg.training.seed, num_processes, rank, drop_last=True)

    def total_steps(self, num_processes: int = 1) -> int:
        """Optimizer steps: training.max_steps, or epochs × the full batches of an epoch
        (⌊n / prompts_per_batch⌋) × the updates per batch of samples (grpo.updates_per_batch; ppo.epochs ×
        ppo.minibatches)."""
        t, m = self.cfg.training, self.cfg.method_config
        return t.max_steps or t.epochs * self.plan(num_processes).steps_per_epoch * m.updates_per_batch

    def summary(self, num_processes: int = 1) -> dict:
        n_train, per_epoch = len(self.examples["train"]), self.plan(num_processes).steps_per_epoch
        return self._summary(n_train, num_processes, per_epoch)

    def _summary(self, train_prompts: int | str, num_processes: int, batches_per_epoch: int | None) -> dict:
        m = self.cfg.method_config
        return {
            "method": self.cfg.method,
            "model": self.model_path,
            "lora": self.cfg.model.lora.enabled,
            "train_prompts": train_prompts,
            "eval_prompts": len(self.examples.get("eval", [])),
            "tokenize": {k: vars(v) for k, v in self.stats.items()},
            "rewards": [{"name": f.name, "weight": f.weight} for f in self.rewards],
            "processes": num_processes,
            "optimizer_steps": self.total_steps(num_processes),
            "sample_batches_per_epoch": batches_per_epoch,
            "completions_per_batch": m.prompts_per_batch * m.completions_per_prompt,
            "optimizer_steps_per_batch": m.updates_per_batch,
            "reference": self._reference(),
            "method_settings": dataclasses.asdict(m),  # as trained: unset (null) keys resolved
        }

    def _reference(self) -> str:
        kind = "adapters disabled" if self.cfg.model.lora.enabled else "frozen copy"
        if self.cfg.method_config.uses_reference():
            return kind
        if "eval" in self.examples:  # online._Evaluator: the KL of its eval rows needs the starting model
            return f"none in training (beta = 0); {kind} for the evaluation's KL"
        return "none (beta = 0)"


def check_batch_fits(cfg: TrainConfig, n_prompts: int) -> None:
    """A batch of samples takes prompts_per_batch distinct prompts and is never short: refuse more prompts
    per batch than there are training prompts."""
    per_batch, key = cfg.method_config.prompts_per_batch, f"{cfg.method}.prompts_per_batch"
    if per_batch > n_prompts:
        raise ConfigError(
            f"{key} ({per_batch}) is larger than the number of training prompts ({n_prompts}, "
            f"{cfg.data.train}): a batch of samples takes {per_batch} distinct prompts and an incomplete "
            f"batch is not trained on, so no batch could be drawn. Set {key} to at most {n_prompts} or add "
            "prompts"
        )


def _load_split_rows(cfg: TrainConfig, log=print, keep_all: bool = False) -> dict[str, list[dict]]:
    d = cfg.data
    columns = {k: v for k, v in vars(d.columns).items()}
    train = load_rows(d.train, columns=columns, split=d.split, keep_all=keep_all)
    if d.eval:
        held = load_rows(d.eval, columns=columns, split=d.eval_split, keep_all=keep_all)
        if [r["_source"] for r in held] == [r["_source"] for r in train]:
            log(
                f"warning: data.eval reads the same records as data.train ({d.eval}): the eval metrics measure "
                "the training data. Name another file, another split (data.eval_split) or use data.eval_fraction"
            )
        return {"train": train, "eval": held}
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


def vocab_size(model_path: str, tokenizer, trust_remote_code: bool = False) -> int:
    """The model's embedding rows (from its config, without loading weights), else the tokenizer's size."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return len(tokenizer)
    size = getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", None
    )
    return int(size) if size else len(tokenizer)


def _check_vocabulary(examples: list[PairExample] | list[UnpairedExample], size: int, split: str) -> None:
    """Token ids outside the model's vocabulary (pre-tokenised rows) are refused with file and line."""
    problems = []
    for e in examples:
        for field_name in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids"):
            ids = getattr(e, field_name, None)
            if ids and max(ids) >= size:
                problems.append(
                    f"{e.source}: field {field_name!r}: token id {max(ids)} is outside the vocabulary"
                )
    if problems:
        shown = "\n  ".join(problems[:10]) + (
            f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise DataError(
            f"{split} data: {len(problems)} token id problem(s) (vocabulary size {size}):\n  {shown}"
        )


def prepare_prompts(cfg: TrainConfig, log=print) -> PreparedPrompts:
    """Prompt data, its tokenisation and the reward functions of an online method, all checked (with
    ``data.streaming``: :func:`prepare_prompt_stream`)."""
    if cfg.data.streaming:
        from .prepare_stream import prepare_prompt_stream

        return prepare_prompt_stream(cfg, log)
    rows = _load_split_rows(cfg, log, keep_all=True)
    for split, split_rows_ in rows.items():
        if not split_rows_:
            raise DataError(
                f"{split} prompts ({cfg.data.train if split == 'train' else cfg.data.eval}) are empty"
            )
    validate_prompt_rows([r for split_rows_ in rows.values() for r in split_rows_])  # one list: every split
    check_batch_fits(cfg, len(rows["train"]))  # before the reward functions and the tokenizer load
    rewards = _load_rewards(cfg)
    model_path = resolve_model_path(cfg.model.name_or_path, log)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    examples, stats = {}, {}
    for split, split_rows_ in rows.items():
        examples[split], stats[split] = _tokenize_prompt_split(cfg, split, split_rows_, tokenizer, log)
    return PreparedPrompts(cfg, model_path, tokenizer, examples, stats, rewards)


def _load_rewards(cfg: TrainConfig) -> list[RewardFunction]:
    """The method's reward functions, each with a unique name (they key the per-function metrics)."""
    rewards = [load_reward(spec) for spec in cfg.method_config.rewards]
    seen: dict[str, int] = {}
    for f in rewards:
        seen[f.name] = seen.get(f.name, 0) + 1
        if seen[f.name] > 1:
            f.name = f"{f.name}#{seen[f.name]}"
    return rewards


def _tokenize_prompt_split(cfg: TrainConfig, split: str, rows: list[dict], tokenizer, log):
    max_prompt = cfg.data.max_prompt_length
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=max_prompt)
    if stats.truncated:
        log(f"{split} prompts: {stats.truncated} of {stats.total} kept their last {max_prompt} tokens")
    return examples, stats


def _unpaired(prep: Prepared) -> Prepared:
    """KTO's records: unpaired rows as tokenised, or the pairs ``prep`` holds split into one desirable and one
    undesirable record each; both labels must be in the training data when both weights are > 0."""
    cfg = prep.cfg
    if not any(isinstance(e, UnpairedExample) for split in prep.examples.values() for e in split[:1]):
        prep.examples = {split: pairs_to_unpaired(pairs) for split, pairs in prep.examples.items()}
    m = cfg.method_config
    check_labels(
        prep.examples["train"], f"train data ({cfg.data.train})", m.desirable_weight, m.undesirable_weight
    )
    return prep


def prepare(cfg: TrainConfig, log=print) -> Prepared | PreparedPrompts:
    """Load and check all data and the tokenizer; raise before training on anything bad (with
    ``data.streaming``: the eval data, and that the training source opens; its records as they are read)."""
    kind = cfg.method_config.kind
    if kind == "online":
        return prepare_prompts(cfg, log)
    if cfg.data.streaming:
        from .prepare_stream import prepare_stream

        return prepare_stream(cfg, log)
    # data.token_cache: the tokenised examples of this data, tokenizer and settings may be on disk already
    model_path = resolve_model_path(cfg.model.name_or_path, log)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    key = _token_cache_key(cfg, tokenizer) if cfg.data.token_cache else None
    examples, stats, _ = token_cache.cached(key, lambda: _read_and_tokenize(cfg, tokenizer, log), log)
    size = vocab_size(model_path, tokenizer, cfg.model.trust_remote_code)
    unpaired = any(isinstance(e, UnpairedExample) for split in examples.values() for e in split[:1])
    what = "records" if unpaired else "pairs"
    for split, split_examples in examples.items():
        dropped = stats[split].dropped_empty + stats[split].dropped_identical
        if dropped:
            more = (
                f" (first {len(stats[split].dropped)} shown)" if dropped > len(stats[split].dropped) else ""
            )
            log(f"{split} data: {dropped} of {stats[split].total} {what} dropped{more}:")
            for line in stats[split].dropped:
                log(f"  {line}")
        if not split_examples:
            raise DataError(
                f"{split} data: every {what[:-1]} was dropped by tokenisation ({vars(stats[split])})"
            )
        if not isinstance(split_examples, token_cache.CachedExamples) or split_examples.max_token() >= size:
            _check_vocabulary(split_examples, size, split)
        if cfg.method_config.requires_scores:
            _check_odpo_scores(cfg, split_examples, split)
    prep = Prepared(cfg, model_path, tokenizer, examples, stats)
    return _unpaired(prep) if kind == "unpaired" else prep


def _read_and_tokenize(cfg: TrainConfig, tokenizer, log=print) -> tuple[dict, dict, list[str]]:
    """Read, check and tokenise an offline run's data (pairs, or KTO's unpaired records): (examples, stats, the
    lines logged while reading), what ``data.token_cache`` keeps."""
    kind, logged = cfg.method_config.kind, []

    def keep(*args) -> None:
        logged.append(" ".join(map(str, args)))
        log(*args)

    rows = _load_split_rows(cfg, keep)
    unpaired = kind == "unpaired" and is_unpaired([r for split_rows_ in rows.values() for r in split_rows_])
    for split, split_rows_ in rows.items():
        if not split_rows_:
            raise DataError(
                f"{split} data ({cfg.data.train if split == 'train' else cfg.data.eval}) has no records"
            )
    _check_rows(cfg, list(rows.values()), unpaired)  # one message for every split's bad rows
    examples, stats = {}, {}
    for split, split_rows_ in rows.items():
        examples[split], stats[split] = _tokenize_split(cfg, split_rows_, tokenizer, unpaired)
    return examples, stats, logged


def _check_rows(cfg: TrainConfig, splits: list[list[dict]], unpaired: bool) -> None:
    """The rows of every split checked: one :class:`DataError` naming each bad row's file and line."""
    m, problems = cfg.method_config, []
    for rows in splits:
        if unpaired:
            problems += unpaired_problems(rows)
            continue
        # a margin in some rows only would be used in some batches only: all rows of a split or none
        margin = m.kind == "reward_model" and m.use_margin and any(r.get("margin") is not None for r in rows)
        problems += pair_problems(rows, require_scores=m.requires_scores, require_margin=margin)
    raise_problems(problems, sum(map(len, splits)))


def _tokenize_split(cfg: TrainConfig, rows: list[dict], tokenizer, unpaired: bool):
    """One split's checked rows tokenised: (examples, :class:`TokenizeStats`)."""
    tokenize = tokenize_unpaired_rows if unpaired else tokenize_rows
    return tokenize(
        rows, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length
    )


def tokens_cached(cfg: TrainConfig) -> bool:
    """Whether ``data.token_cache`` holds this config's tokenised data (whole-file runs only): its rows were
    checked when it was written, so ``validate`` need not read the file again."""
    if cfg.data.streaming or not cfg.data.token_cache:
        return False
    model_path = resolve_model_path(cfg.model.name_or_path, lambda *_: None)
    key = _token_cache_key(cfg, load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code))
    return key is not None and token_cache.load(key) is not None


def _token_cache_key(cfg: TrainConfig, tokenizer) -> str | None:
    """The ``data.token_cache`` entry of this config's data (:func:`preftune.data.token_cache.cache_key`)."""
    d, m = cfg.data, cfg.method_config
    settings = {
        "columns": vars(d.columns), "split": d.split, "eval_split": d.eval_split if d.eval else None,
        "eval_fraction": 0.0 if d.eval else d.eval_fraction,
        "seed": cfg.training.seed if d.eval_fraction > 0 and not d.eval else None,
        "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
        "unpaired": m.kind == "unpaired", "requires_scores": m.requires_scores,
        "use_margin": m.kind == "reward_model" and m.use_margin,
    }  # fmt: skip
    return token_cache.cache_key({"train": d.train, "eval": d.eval}, tokenizer, settings)
