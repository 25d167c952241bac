"""From a config to a trained model: prepare (data, model, checks) -> the method's loop -> save.

``prepare`` does everything that can fail on bad input before any training starts; ``preftune validate``
runs it alone. Which loop and family a method trains with is one explicit table, :data:`TRAINERS`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import METHOD_SECTIONS, TrainConfig, dump_yaml, load_config
from ..data.stream import StreamPlan
from ..files import write_json_atomic, write_text_atomic
from ..models import add_lora, enable_gradient_checkpointing, load_model, save_model
from .checkpoint import latest_checkpoint
from .engine import (
    check_mixed_precision,
    finite_or_none,
    limit_heap_growth,
    make_accelerator,
    sum_over_processes,
    tracker_config,
)
from .grpo import train_grpo
from .kto import KTOFamily
from .loop import evaluate, fit
from .online_dpo import train_online_dpo
from .pairs import PairFamily
from .ppo import train_ppo
from .prepare import Prepared, PreparedPrompts, prepare, tokens_cached
from .reference import (
    build_reference,
    load_pair_logps,
    pair_reference_logps,
    precomputes_reference,
    reference_cache_file,
    save_pair_logps,
    setup_reference,
    uses_reference,
)
from .reward_model import RewardModelFamily
from .rundir import RunDirError, check_run_dir, create_run_dir
from .sharding import SHARDED_DIR, is_sharded, save_full, shard_model
from .signals import StopSignals, stop_signals

__all__ = ["Prepared", "RunDirError", "TRAINERS", "prepare", "train", "validate"]


@dataclass
class Session:
    """What a method's trainer is handed: the checked config and data, the process group, the run
    directory, the model on its device, and where to resume from."""

    cfg: TrainConfig
    prep: Prepared | PreparedPrompts
    accelerator: object
    run_dir: Path
    model: object
    resume_from: Path | None
    log: Callable
    signals: StopSignals
    on_step_end: Callable[[int, dict], None] | None = None
    ref_cache_dir: Path | None = None


def _fit_offline(s: Session, family) -> dict:
    """The offline loop over ``family``'s train split, evaluating its eval split when there is one."""
    eval_fn = None
    if "eval" in s.prep.examples:
        n_eval = len(s.prep.examples["eval"])

        def eval_fn(m):
            make = lambda idx: family.make_batch("eval", idx)  # noqa: E731
            with s.accelerator.autocast():
                return evaluate(m, family.compute, make, n_eval, s.cfg.training.eval_batch_size)

    train_examples = s.prep.examples["train"]
    plan, streamed = None, s.cfg.data.streaming
    if streamed:  # the train examples are read as consumed (data/stream.py): its plan, not a permutation
        t, acc = s.cfg.training, s.accelerator
        plan = StreamPlan(
            train_examples, t.batch_size, t.grad_accum, acc.num_processes, acc.process_index, s.log
        )

    return fit(
        s.cfg,
        accelerator=s.accelerator,
        model=s.model,
        tokenizer=s.prep.tokenizer,
        n_train=0 if streamed else len(train_examples),
        make_batch=lambda idx: family.make_batch("train", idx),
        compute=family.compute,
        run_dir=s.run_dir,
        resume_from=s.resume_from,
        eval_fn=eval_fn,
        on_step_end=s.on_step_end,
        signals=s.signals,
        describe=lambda idx: [train_examples[i].source for i in idx],
        lengths=None if streamed else family.lengths("train"),
        plan=plan,
        rows=family.token_rows("train") if s.cfg.training.max_tokens_per_batch else None,
        begin_micro=getattr(family, "begin_micro", None),
        log=s.log,
    )


def train_pairs(s: Session) -> dict:
    family = PairFamily(s.cfg, s.prep.examples, s.prep.tokenizer.pad_token_id)
    if uses_reference(s.cfg):
        _setup_pair_reference(s, family)
    s.accelerator.wait_for_everyone()  # every process has read or computed the reference before it is written
    return _fit_offline(s, family)


def train_unpaired(s: Session) -> dict:
    """KTO: its reference runs on every batch (its mismatched KL pairs follow the shuffle; training/kto.py)"""
    family = KTOFamily(
        s.cfg, s.prep.examples, s.prep.tokenizer.pad_token_id, lambda v: sum_over_processes(s.accelerator, v)
    )

    family.reference = setup_reference(
        s.model, s.cfg, s.prep.model_path, policy_trained=s.resume_from is not None
    )
    if s.cfg.training.precompute_ref:
        s.log(
            f"{s.cfg.method}: the reference runs on every batch (its mismatched KL pairs change with the "
            "shuffle); training.precompute_ref does not apply"
        )
    return _fit_offline(s, family)


def train_reward_model(s: Session) -> dict:
    tok = s.prep.tokenizer
    return _fit_offline(s, RewardModelFamily(s.cfg, s.prep.examples, tok.pad_token_id, tok.eos_token_id))


# method -> its trainer: the family it batches with and the loop it runs (every method of
# config.METHOD_SECTIONS; tests/test_registry.py checks that the two tables and the docs agree)
TRAINERS: dict[str, Callable[[Session], dict]] = {
    **{name: train_pairs for name, section in METHOD_SECTIONS.items() if section.kind == "pair"},
    "kto": train_unpaired,
    "reward_model": train_reward_model,
    "grpo": train_grpo,
    "ppo": train_ppo,
    "online_dpo": train_online_dpo,
}


def _build_model(cfg: TrainConfig, prep: Prepared, resume_from: Path | None):
    is_rm = cfg.method_config.kind == "reward_model"
    source = prep.model_path
    # a sharded checkpoint holds its weights as shards: the starting model is built, then they are loaded
    sharded_resume = resume_from is not None and cfg.training.sharding == "fsdp"
    if resume_from is not None and (resume_from / SHARDED_DIR).is_dir() != sharded_resume:
        written = "with" if (resume_from / SHARDED_DIR).is_dir() else "without"
        raise RunDirError(
            f"--resume: {resume_from} was written {written} training.sharding: fsdp, and this run has "
            f"training.sharding: {cfg.training.sharding}; resume with the sharding it was written with"
        )
    if resume_from is not None and not cfg.model.lora.enabled and not sharded_resume:
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
        if resume_from is not None and not sharded_resume:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, resume_from / "model", is_trainable=True)
        else:
            model = add_lora(model, cfg.model.lora, task_type=task)
    if cfg.training.gradient_checkpointing:  # activations recomputed in the backward (train mode only)
        enable_gradient_checkpointing(model)
    # trained weights are fp32 master weights (LoRA adapters, a reward head kept trainable under LoRA);
    # half precision is storage for frozen weights only, and compute precision is training.mixed_precision
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _load_adapter(cfg: TrainConfig, prep: Prepared, folder: Path):
    """The LoRA adapter saved in ``folder`` on a fresh copy of the starting model (merging a sharded run)."""
    from peft import PeftModel

    base = load_model(
        prep.model_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        sequence_classification=cfg.method_config.kind == "reward_model",
        pad_token_id=prep.tokenizer.pad_token_id,
    )
    return PeftModel.from_pretrained(base, folder)


def train(
    config: TrainConfig | dict | str | Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    allow_changes: Iterable[str] = (),
    on_step_end: Callable[[int, dict], None] | None = None,
    ref_cache_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Train per ``config`` (a :class:`TrainConfig`, a dict or a YAML path); returns the run directory (final
    model in ``<run_dir>/model``).

    ``resume``: continue from the run directory's latest checkpoint; the config must equal the interrupted
    run's except for the keys named in ``allow_changes`` (``"training.max_steps"``, ...). ``"auto"``: return
    a finished run (``model/`` and ``result.json`` there) as it is, resume one with a complete checkpoint,
    and otherwise start afresh, replacing whatever an interrupted start left in the run directory.
    ``ref_cache_dir``: where the precomputed reference log-probs are cached across runs (the content-addressed
    files of :func:`~preftune.training.reference.reference_cache_file`) instead of ``$PREFTUNE_REF_CACHE`` or
    the user's cache; the experiment points it at its own folder, so its runs on one set of pairs share them.
    Ctrl-C and SIGTERM stop the run after the current step with a checkpoint of it (``signals.py``); one
    during the final evaluation and save is held until the model is written, then raised.
    """
    from accelerate.utils import set_seed

    cfg = load_config(config)
    trainer = TRAINERS[cfg.method]
    if resume == "auto":
        run_dir = Path(cfg.training.output_dir)
        if (run_dir / "result.json").is_file() and (run_dir / "model").is_dir():
            log(f"{run_dir} is complete (model/ and result.json are there): nothing to train")
            return run_dir
        resume = latest_checkpoint(run_dir) is not None
        overwrite = overwrite or not resume
    elif not isinstance(resume, bool):
        raise ValueError(f"train: resume must be True, False or 'auto', got {resume!r}")
    limit_heap_growth()
    with stop_signals() as signals:
        prep = prepare(cfg, log)
        run_dir = Path(cfg.training.output_dir)
        accelerator = make_accelerator(cfg.training, run_dir)
        resume_from = check_run_dir(  # every process checks, so all fail alike
            run_dir, resume=resume, overwrite=overwrite, cfg=cfg, allow_changes=frozenset(allow_changes)
        )
        accelerator.wait_for_everyone()  # all have checked before the main process changes anything
        summary = prep.summary(accelerator.num_processes)
        if accelerator.is_main_process:
            if resume_from is None:
                create_run_dir(run_dir, overwrite=overwrite)
            log(json.dumps(summary, indent=2))
            write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg.to_dict()))
            write_json_atomic(run_dir / "data_summary.json", summary)
        accelerator.wait_for_everyone()

        set_seed(cfg.training.seed)
        if cfg.training.report_to:
            accelerator.init_trackers(run_dir.name, config=tracker_config(cfg.to_dict()))
        model = _build_model(cfg, prep, resume_from).to(accelerator.device)
        if cfg.training.sharding == "fsdp":  # parameters, gradients and optimizer state split over processes
            model = shard_model(model, cfg.training, accelerator.device)
        cache_dir = Path(ref_cache_dir) if ref_cache_dir is not None else None
        session = Session(
            cfg, prep, accelerator, run_dir, model, resume_from, log, signals, on_step_end, cache_dir
        )
        started = time.time()
        last = trainer(session)
        with signals.deferred():  # the final save completes whatever arrives meanwhile
            accelerator.wait_for_everyone()
            if is_sharded(model):  # gathered on the main process, one parameter at a time (collective)
                save_full(model, prep.tokenizer, run_dir / "model", is_main=accelerator.is_main_process)
            if accelerator.is_main_process:
                final = accelerator.unwrap_model(model)
                if not is_sharded(model):
                    save_model(final, prep.tokenizer, run_dir / "model")
                if cfg.model.lora.enabled and cfg.model.lora.merge:
                    if is_sharded(model):  # the saved adapter onto the starting base, in this process
                        final = _load_adapter(cfg, prep, run_dir / "model")
                    save_model(final, prep.tokenizer, run_dir / "model_merged", merge_lora=True)
                result = {
                    "final_train_metrics": finite_or_none(last),  # NaN explained variance: constant returns
                    "train_seconds": time.time() - started,
                    **summary,
                }
                write_json_atomic(run_dir / "result.json", finite_or_none(result))
                log(f"saved {run_dir / 'model'}")
            stop = signals.requested(accelerator)  # a collective: before the process group ends
            accelerator.end_training()
        if stop is not None:
            log(
                f"stopped ({type(stop).__name__}) after the run finished: the model is saved in {run_dir / 'model'}"
            )
            raise stop
    return run_dir


def _setup_pair_reference(s: Session, family: PairFamily) -> None:
    """Precomputed reference log-probs (cached in the run dir for resume, and across runs in the shared cache,
    ``s.ref_cache_dir`` when the caller gives one), or a reference that runs on every batch."""
    cfg, prep = s.cfg, s.prep
    if cfg.data.streaming and cfg.training.precompute_ref:
        s.log(
            "data.streaming: the reference runs on every batch (precomputed log-probs would need every record "
            "before step 1); training.precompute_ref does not apply"
        )
    if not precomputes_reference(cfg):
        family.reference = setup_reference(
            s.model, cfg, prep.model_path, policy_trained=s.resume_from is not None
        )
        return
    cache = s.run_dir / "ref_logps.safetensors"
    if cache.is_file():
        family.ref_logps = load_pair_logps(cache, prep.examples)
        return
    if s.resume_from is not None and not cfg.model.lora.enabled:
        raise RuntimeError(f"{cache} is missing: cannot rebuild reference log-probs from a trained policy")
    shared = reference_cache_file(cfg, prep.model_path, prep.examples) if cfg.training.ref_cache else None
    if shared is not None and s.ref_cache_dir is not None:
        shared = s.ref_cache_dir / shared.name
    if shared is not None and shared.is_file():  # computed by an earlier run on the same data and model
        family.ref_logps = load_pair_logps(shared, prep.examples)
        if s.accelerator.is_main_process:
            save_pair_logps(cache, family.ref_logps)
            s.log(f"reference log-probs from the cache ({shared}; --no-ref-cache to recompute)")
        return
    started = time.time()
    reference = build_reference(s.model, during_training=False)
    batch_size, pad = cfg.training.eval_batch_size, prep.tokenizer.pad_token_id
    with s.accelerator.autocast():  # the same compute precision as the policy's log-probs
        family.ref_logps = {
            split: pair_reference_logps(reference, examples, pad, batch_size, cfg.training.share_prefix)
            for split, examples in prep.examples.items()
        }
    if s.accelerator.is_main_process:
        save_pair_logps(cache, family.ref_logps)
        if shared is not None:
            save_pair_logps(shared, family.ref_logps)
        n = sum(len(v) for v in prep.examples.values())
        where = f"{cache}" + (f" and {shared}" if shared is not None else "")
        seconds = time.time() - started
        s.log(f"reference log-probs for {n} pairs computed in {seconds:.1f}s (cached in {where})")


PLAN_SAMPLE = 256  # streamed records `validate` tokenises (drops, vocabulary) and plans the memory of


def _first_pass(stream, n: int, stats) -> tuple[list, dict]:
    """The first ``n`` examples of a stream, or all of its first pass if shorter, and the tokenizer's counts
    (``stats``, counting as the stream reads) as they stood after the last of them: a record of a second pass,
    read to find that the first had ended, is not counted."""
    first, counts = [], copy.deepcopy(vars(stats))
    for i in range(n):
        example = stream[i]
        if stream.pass_of[i] > 0:
            break
        first.append(example)
        counts = copy.deepcopy(vars(stats))
    return first, counts


def _scan_train_data(cfg: TrainConfig) -> None:
    """One pass over the training pairs with bounded memory (``data/stream.py``): every record read and
    checked, unreadable ones included; a :class:`DataError` lists the first 20 problems with their lines and
    counts the rest. A source that cannot be read a record at a time (a JSON list) is left to ``prepare``
    without streaming."""
    from ..data import DataError
    from ..data.stream import scan_pairs

    d, m = cfg.data, cfg.method_config
    use_margin = m.kind == "reward_model" and m.use_margin
    try:
        scan = scan_pairs(
            d.train, columns=dict(vars(d.columns)), split=d.split, require_scores=m.requires_scores,
            require_margin=(None if use_margin else False) if d.streaming else False,
        )  # fmt: skip
    except DataError:
        if d.streaming:
            raise
        return  # prepare reads it whole and says what is wrong
    if scan.problems:
        raise DataError(scan.message())


def _scan_prompt_data(cfg: TrainConfig) -> None:
    """A streamed online run's training prompts read once with bounded memory (``data/stream.py``): the
    first 20 problems with their lines and the count of the rest, as :func:`_scan_train_data`; then whether
    a batch of samples fits in the prompts there are."""
    from ..data import DataError
    from ..data.stream import scan_prompts
    from .prepare import check_batch_fits

    d = cfg.data
    scan = scan_prompts(d.train, columns=dict(vars(d.columns)), split=d.split)
    if scan.problems:
        raise DataError(scan.message())
    check_batch_fits(cfg, scan.rows)


def validate(
    config: TrainConfig | dict | str | Path, *, load_weights: bool = True, num_processes: int = 1, log=print
) -> dict:
    """Everything ``train`` checks, without training: returns the summary that would be trained with
    ``num_processes`` processes, with the model (``load_weights``) also its ``memory_plan`` per process
    (:func:`preftune.training.memory.plan_run`, bytes)."""
    from .memory import plan_run

    cfg = load_config(config)
    check_mixed_precision(cfg.training)
    if cfg.method_config.kind in ("pair", "reward_model") and not tokens_cached(cfg):
        _scan_train_data(cfg)  # (a token-cache hit: the rows were checked when the entry was written)
    if cfg.method_config.kind == "online" and cfg.data.streaming:
        _scan_prompt_data(cfg)
    prep = prepare(cfg, log)
    summary = prep.summary(num_processes)
    first = None
    if cfg.data.streaming:  # the first records (prompts), read and tokenised
        first, counts = _first_pass(prep.examples["train"], PLAN_SAMPLE, prep.stats["train"])
        summary.setdefault("tokenize", {})["train"] = {
            **counts,
            "of": f"the records read for the first {len(first)} streamed examples (the shuffle buffer reads ahead)",
        }
    if load_weights:
        model = _build_model(cfg, prep, None)
        if first is not None:  # the longest micro-batch of the first records; no precomputed reference
            prep = dataclasses.replace(prep, examples={**prep.examples, "train": first})
            summary["memory_plan_note"] = (
                f"activations of the longest micro-batch of the first {len(first)} streamed records "
                f"(data.max_length {cfg.data.max_length} bounds every record)"
            )
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary["reference"] = summary.get("reference") or (
            "none"
            if not uses_reference(cfg)
            else "adapters disabled"
            if cfg.model.lora.enabled
            else "precomputed"
            if precomputes_reference(cfg)
            else "frozen copy"
        )
        summary["memory_plan"] = plan_run(cfg, prep, model, num_processes).to_dict()
    return summary
