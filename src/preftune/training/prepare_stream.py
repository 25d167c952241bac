"""Preparation of a streamed run (``data.streaming: true``): the training records or prompts as an
:class:`~preftune.data.stream.ExampleStream`, read, checked and tokenised as training consumes them, and
everything else checked as :mod:`preftune.training.prepare` checks it before step 1 (the eval data loaded
whole, the tokenizer, the reward functions; only the first record of the training source is read).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from ..data import (
    DataError,
    PairExample,
    UnpairedExample,
    check_labels,
    is_unpaired,
    load_rows,
    pairs_to_unpaired,
)
from ..data.prompts import validate_prompt_rows
from ..models import load_tokenizer, resolve_model_path
from .prepare import (
    Prepared,
    PreparedPrompts,
    _check_odpo_scores,
    _check_rows,
    _check_vocabulary,
    _load_rewards,
    _tokenize_prompt_split,
    _tokenize_split,
    check_batch_fits,
    vocab_size,
)


@dataclass
class PreparedStream(Prepared):
    """A streamed run's data (``data.streaming``): ``examples["train"]`` is an
    :class:`~preftune.data.stream.ExampleStream`, read, checked and tokenised as training consumes it;
    ``examples["eval"]`` (``data.eval``) is loaded whole as without streaming."""

    def summary(self, num_processes: int = 1) -> dict:
        from .reference import uses_reference

        t, d = self.cfg.training, self.cfg.data
        per_step = t.batch_size * t.grad_accum * num_processes
        what = "records" if self.cfg.method_config.kind == "unpaired" else "pairs"
        summary = {
            "method": self.cfg.method,
            "model": self.model_path,
            "lora": self.cfg.model.lora.enabled,
            f"train_{what}": f"streamed from {d.train} (read, checked and tokenised as consumed)",
            f"eval_{what}": len(self.examples.get("eval", [])),
            "streaming": {"shuffle_buffer": d.shuffle_buffer, "seed": t.seed},
            "tokenize": {k: vars(v) for k, v in self.stats.items() if k != "train"},
            "processes": num_processes,
            "optimizer_steps": t.max_steps,
            "steps_per_epoch": None,
            f"{what}_per_step": per_step,
        }
        if uses_reference(self.cfg):
            summary["reference"] = (
                "adapters disabled, on every batch"
                if self.cfg.model.lora.enabled
                else "frozen copy, on every batch"
            ) + " (data.streaming: no precomputed log-probs, the data is not known before step 1)"
        return summary


LABEL_LOOKAHEAD = 256  # streamed KTO records among which both labels must appear (data.streaming)


def prepare_stream(cfg: TrainConfig, log=print) -> PreparedStream:
    """The streamed train data (nothing read yet but the first record, to fail early on a missing file, a JSON
    list or a missing column) and the eval data, loaded and checked whole as :func:`prepare` does."""
    from ..data.load import iter_rows
    from ..data.stream import PairProcessor, UnpairedProcessor, record_stream

    d, m = cfg.data, cfg.method_config
    columns = dict(vars(d.columns))
    first = next(iter_rows(d.train, columns=columns, split=d.split), None)
    if first is None:
        raise DataError(f"train data ({d.train}) has no records")
    kto = m.kind == "unpaired"
    if kto and not is_unpaired([first]):
        raise DataError(
            f"train data ({d.train}): {cfg.method} with data.streaming reads unpaired records (prompt, completion, "
            f"label), and {first['_source']} is a pair. Write each pair as two records (chosen: label true, "
            "rejected: label false), or set data.streaming: false (pairs are split into two records then)"
        )
    model_path = resolve_model_path(cfg.model.name_or_path, log)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    size = vocab_size(model_path, tokenizer, cfg.model.trust_remote_code)
    examples, stats = {}, {}
    if d.eval:
        rows = load_rows(d.eval, columns=columns, split=d.eval_split)
        if not rows:
            raise DataError(f"eval data ({d.eval}) has no records")
        unpaired = kto and is_unpaired(rows)
        _check_rows(cfg, [rows], unpaired)
        examples["eval"], stats["eval"] = _tokenize_split(cfg, rows, tokenizer, unpaired)
        if not examples["eval"]:
            raise DataError(f"eval data: every record was dropped by tokenisation ({vars(stats['eval'])})")
        _check_vocabulary(examples["eval"], size, "eval")
        if m.requires_scores:
            _check_odpo_scores(cfg, examples["eval"], "eval")
        if kto and not unpaired:
            examples["eval"] = pairs_to_unpaired(examples["eval"])

    def check(example: PairExample | UnpairedExample) -> None:
        _check_vocabulary([example], size, "train data (streamed)")
        if m.requires_scores:
            _check_odpo_scores(cfg, [example], "train data (streamed)")

    if kto:
        processor = UnpairedProcessor(
            tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length, check=check, log=log
        )
    else:
        use_margin = m.kind == "reward_model" and m.use_margin
        processor = PairProcessor(
            tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
            require_scores=m.requires_scores, require_margin=None if use_margin else False, check=check,
            log=log,
        )  # fmt: skip
    examples["train"] = record_stream(
        d.train, processor, columns=columns, split=d.split, buffer=d.shuffle_buffer, seed=cfg.training.seed
    )
    stats["train"] = processor.stats  # counts as the stream is consumed
    if kto:  # both labels, where both weights are > 0: looked for among the first records (read once)
        stream, first_records = examples["train"], []
        for i in range(LABEL_LOOKAHEAD):  # (of the first pass: a short file's records are not counted twice)
            record = stream[i]
            if stream.pass_of[i] > 0:
                break
            first_records.append(record)
        where = f"train data ({d.train}, its first {len(first_records)} streamed records)"
        check_labels(first_records, where, m.desirable_weight, m.undesirable_weight)
    return PreparedStream(cfg, model_path, tokenizer, examples, stats)


@dataclass
class PreparedPromptStream(PreparedPrompts):
    """A streamed online run's prompts (``data.streaming``): ``examples["train"]`` is an
    :class:`~preftune.data.stream.ExampleStream` of :class:`PromptExample`, read, checked and tokenised as
    sampling consumes it; ``examples["eval"]`` (``data.eval``) is loaded whole as without streaming."""

    def plan(self, num_processes: int = 1, rank: int = 0):
        """Sampling batch b takes the stream's prompts ``[b·P, (b+1)·P)``, each process its share
        (:class:`~preftune.data.stream.PromptStreamPlan`)."""
        from ..data.stream import PromptStreamPlan

        m = self.cfg.method_config
        for ok, message in m.processes_checks(num_processes):
            if not ok:
                raise ConfigError(message)
        return PromptStreamPlan(
            self.examples["train"], m.prompts_per_batch, m.updates_per_batch, num_processes, rank,
            too_few=lambda n: check_batch_fits(self.cfg, n),
        )  # fmt: skip

    def total_steps(self, num_processes: int = 1) -> int:
        return self.cfg.training.max_steps

    def summary(self, num_processes: int = 1) -> dict:
        """:meth:`PreparedPrompts.summary` of a stream: no prompt count, no epochs (training.max_steps)."""
        d, t = self.cfg.data, self.cfg.training
        summary = self._summary(
            f"streamed from {d.train} (read, checked and tokenised as consumed)", num_processes, None
        )
        summary["tokenize"] = {k: vars(v) for k, v in self.stats.items() if k != "train"}
        return {**summary, "streaming": {"shuffle_buffer": d.shuffle_buffer, "seed": t.seed}}


def prepare_prompt_stream(cfg: TrainConfig, log=print) -> PreparedPromptStream:
    """The streamed train prompts (nothing read yet but the first record, to fail early on a missing file, a
    JSON list or an empty source), the reward functions, and the eval prompts loaded and checked whole as
    :func:`prepare_prompts` does."""
    from ..data.load import iter_rows
    from ..data.stream import PromptProcessor, record_stream

    d = cfg.data
    columns = dict(vars(d.columns))
    if next(iter_rows(d.train, columns=columns, split=d.split, keep_all=True), None) is None:
        raise DataError(f"train prompts ({d.train}) are empty")
    eval_rows = None
    if d.eval:
        eval_rows = load_rows(d.eval, columns=columns, split=d.eval_split, keep_all=True)
        if not eval_rows:
            raise DataError(f"eval prompts ({d.eval}) are empty")
        validate_prompt_rows(eval_rows)
    rewards = _load_rewards(cfg)
    model_path = resolve_model_path(cfg.model.name_or_path, log)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    examples, stats = {}, {}
    if eval_rows is not None:
        examples["eval"], stats["eval"] = _tokenize_prompt_split(cfg, "eval", eval_rows, tokenizer, log)
    processor = PromptProcessor(tokenizer, max_prompt_length=d.max_prompt_length)
    examples["train"] = record_stream(
        d.train,
        processor,
        columns=columns,
        split=d.split,
        buffer=d.shuffle_buffer,
        seed=cfg.training.seed,
        keep_all=True,
    )
    stats["train"] = processor.stats  # counts as the stream is consumed
    return PreparedPromptStream(cfg, model_path, tokenizer, examples, stats, rewards)
