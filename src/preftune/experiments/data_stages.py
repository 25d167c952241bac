"""The experiment's data stages: ``prompts`` -> ``samples`` (scored) -> ``pairs`` / ``pairs-<variant>``, and
``unpaired`` (KTO's records). Each row that training reads keeps the sampled token ids beside the texts, so
training and evaluation see exactly the tokens the model sampled rather than a re-tokenisation of the
decoded text."""

from __future__ import annotations

import time
from pathlib import Path

from ..files import read_jsonl, write_jsonl_atomic
from ..rewards import RewardError
from ..sampling import derive_seed, generation_kwargs, sample_responses
from .config import UNPAIRED_STAGE, PairsConfig, stage_with_variant
from .context import Context
from .fingerprints import text_sha256
from .pairs import build_pairs, label_by_median, subsample_pairs
from .prompts import load_prompts, split_validation


def prompts_stage(ctx: Context) -> None:
    """``prompts``: the training, held-out and (with ``validation_fraction``) validation prompts."""
    p = ctx.cfg.prompts
    files = {  # the prompts by content, built-in lists included
        split: text_sha256("\n".join(load_prompts(path, split)))
        for split, path in (("train", p.train_file), ("heldout", p.heldout_file))
    }
    validation_seed = derive_seed(ctx.cfg.seed, "validation")

    def fn(out: Path) -> dict:
        train = load_prompts(p.train_file, "train")[: p.n_train]
        train, validation = split_validation(train, p.validation_fraction, validation_seed)
        held = load_prompts(p.heldout_file, "heldout")[: p.n_heldout]
        (out / "train.txt").write_text("\n".join(train) + "\n")
        (out / "heldout.txt").write_text("\n".join(held) + "\n")
        if validation:
            (out / "validation.txt").write_text("\n".join(validation) + "\n")
            return {"train": len(train), "validation": len(validation), "heldout": len(held)}
        return {"train": len(train), "heldout": len(held)}

    inputs = {"files": files, "n_train": p.n_train, "n_heldout": p.n_heldout}
    if p.validation_fraction:  # absent otherwise: experiments without validation keep their fingerprints
        inputs.update(validation_fraction=p.validation_fraction, validation_seed=validation_seed)
    ctx.stage("prompts", inputs, fn)


def sample_and_score(
    ctx: Context, model, prompts: list[str], out: Path, *, k: int, sc, seed: int, logps: bool = False
) -> dict:
    """``k`` samples per prompt from ``model`` (generation settings ``sc``), scored by the experiment's reward,
    written to ``out/samples.jsonl`` (one record per prompt: texts, token ids, scores, and with ``logps`` each
    sample's log-prob under the sampler); returns a summary."""
    started = time.time()
    with ctx.compute():
        samples = sample_responses(
            model, ctx.tokenizer, prompts, k=k, **generation_kwargs(sc), seed=seed, progress=ctx.cfg.progress,
            logps=logps,
        )  # fmt: skip
    flat_prompts, flat_responses = samples.flat()
    scores = ctx.reward(flat_prompts, flat_responses, samples.flat_ids())
    if None in scores:
        raise RewardError(
            f"reward {ctx.reward.name!r} gave no score (None) for a sample; the experiment needs one"
        )
    records = samples.records(scores)
    for rec, pids, rids in zip(records, samples.prompt_ids, samples.response_ids):
        rec["prompt_ids"], rec["response_ids"] = pids, rids
    write_jsonl_atomic(out / "samples.jsonl", records)
    n_tokens = sum(len(r) for rs in samples.response_ids for r in rs)
    seconds = time.time() - started
    return {
        "responses": len(flat_responses),
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
    }


def samples_stage(ctx: Context) -> None:
    """``samples``: ``sample.k`` responses per training prompt from the base model, scored."""
    sc = ctx.cfg.sample
    inputs = {
        "prompts": ctx.fp("prompts"),
        "model": ctx.model_id,
        "dtype": ctx.cfg.dtype,
        "sample": vars(sc),
        "seed": ctx.cfg.seed,
        "reward": ctx.reward_id,
    }
    seed = derive_seed(ctx.cfg.seed, "samples")
    ctx.stage(
        "samples",
        inputs,
        lambda out: sample_and_score(ctx, ctx.base, ctx.prompts("train"), out, k=sc.k, sc=sc, seed=seed),
    )


def pairs_with_ids(records: list[dict], mode: str) -> tuple[list[dict], dict]:
    """Preference pairs from scored samples (:func:`.pairs.build_pairs`), each row carrying the sampled token
    ids beside the texts (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    rows, stats = [], {}
    for rec in records:
        ids = dict(zip(rec["responses"], rec["response_ids"]))
        rec_rows, rec_stats = build_pairs([rec], mode=mode)
        for key, value in rec_stats.items():
            stats[key] = stats.get(key, 0) + value
        for row in rec_rows:
            row.update(
                prompt_ids=rec["prompt_ids"], chosen_ids=ids[row["chosen"]], rejected_ids=ids[row["rejected"]]
            )
            rows.append(row)
    return rows, stats


def pairs_stage(ctx: Context, pairs: PairsConfig, variant: str | None = None) -> None:
    """One stage per pairs setting: ``pairs`` (the experiment's) or ``pairs-<variant>`` (a methods entry's
    own), fingerprinted by the setting; a capped setting keeps a fixed random subset of the pairs."""

    def fn(out: Path) -> dict:
        records = read_jsonl(ctx.root / "samples" / "samples.jsonl")
        rows, stats = pairs_with_ids(records, pairs.mode)
        kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
        stats["empty_dropped"] = len(rows) - len(kept)
        if not kept:
            raise RuntimeError(f"no preference pairs: every prompt's responses tied ({stats})")
        if pairs.max_pairs is not None:
            stats["pairs_before_cap"] = len(kept)
            kept = subsample_pairs(kept, pairs.max_pairs, derive_seed(ctx.cfg.seed, "pairs"))
        stats["pairs"] = len(kept)
        write_jsonl_atomic(out / "pairs.jsonl", kept)
        return stats

    inputs = {"samples": ctx.fp("samples"), "mode": pairs.mode, "format": "with-token-ids"}
    if pairs.max_pairs is not None:  # absent otherwise: uncapped stages keep their earlier fingerprints
        inputs.update(max_pairs=pairs.max_pairs, subset_seed=ctx.cfg.seed)
    ctx.stage(stage_with_variant("pairs", variant), inputs, fn)


def unpaired_with_ids(records: list[dict]) -> tuple[list[dict], dict]:
    """KTO's records from scored samples (:func:`.pairs.label_by_median`), each carrying the sampled token
    ids (``prompt_ids``, ``completion_ids``); empty completions are dropped (``empty_dropped``) and the label
    counts are those of the records kept."""
    rows, stats = [], {}
    for rec in records:
        ids = dict(zip(rec["responses"], rec["response_ids"]))
        rec_rows, rec_stats = label_by_median([rec])
        for key, value in rec_stats.items():
            stats[key] = stats.get(key, 0) + value
        for row in rec_rows:
            row.update(prompt_ids=rec["prompt_ids"], completion_ids=ids[row["completion"]])
        rows += rec_rows
    kept = [r for r in rows if r["completion"].strip()]
    stats["empty_dropped"] = len(rows) - len(kept)
    stats["desirable"] = sum(r["label"] for r in kept)
    stats["undesirable"] = len(kept) - stats["desirable"]
    stats["records"] = len(kept)
    return kept, stats


def unpaired_stage(ctx: Context) -> None:
    """``unpaired``: KTO's records from the samples: per training prompt, each response above the prompt's
    median reward desirable, each below it undesirable, at the median left out (``unpaired.jsonl``: prompt,
    completion, label, the token ids; what ``preftune train`` with method kto reads)."""

    def fn(out: Path) -> dict:
        rows, stats = unpaired_with_ids(read_jsonl(ctx.root / "samples" / "samples.jsonl"))
        if not rows:
            raise RuntimeError(f"no unpaired records: every prompt's responses tied ({stats})")
        write_jsonl_atomic(out / "unpaired.jsonl", rows)
        return stats

    inputs = {"samples": ctx.fp("samples"), "rule": "median", "format": "with-token-ids"}
    ctx.stage(UNPAIRED_STAGE, inputs, fn)
