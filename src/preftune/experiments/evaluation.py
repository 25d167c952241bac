"""The experiment's evaluation stages, ``eval/<model>`` on the held-out prompts and ``validation/<model>`` on the
validation prompts (tuning), and the result rows built from them.

Per model and seed: ``eval.samples_per_prompt`` samples per prompt at temperature 1 (its own random stream,
derived from the seed); mean reward ± standard error clustered by prompt; KL(π_θ‖π_ref) estimated from the
same samples as the mean of log π_θ(y|x) − log π_ref(y|x) (on the sampled token ids, not re-tokenised text);
the win rate against the base model's samples (same prompt and slot, the reward as judge); and SimPO's
diagnostic: the share of held-out preference pairs (from the base model's held-out samples) whose average
log-likelihood ordering under the model agrees with the reward ordering."""

from __future__ import annotations

import json
from pathlib import Path

from .. import heldout
from .. import metrics as M
from ..files import read_jsonl, write_json_atomic
from ..logprobs import score_groups
from ..models import load_for_inference
from ..sampling import derive_seed
from .config import PlannedRun, entry_tune, experiment_seeds, seed_suffix
from .context import Context
from .data_stages import pairs_with_ids, sample_and_score
from .report import aggregate_seeds, write_results
from .tuning import mark_chosen


def evaluate_model(
    ctx: Context, model, out: Path, held_pairs: list[dict] | None, seed: int, split: str
) -> dict:
    """Sample, score and measure one model on ``split``'s prompts into ``out`` (``samples.jsonl``,
    ``rewards.json``, ``kl.json``: each sample's log π_θ − log π_ref); returns the summary."""
    ec = ctx.cfg.eval
    seed = derive_seed(seed, "eval")  # its own stream: never the training samples' seeds
    trained = model is not ctx.base
    summary = sample_and_score(
        ctx, model, ctx.prompts(split), out, k=ec.samples_per_prompt, sc=ec, seed=seed, logps=trained
    )
    records = read_jsonl(out / "samples.jsonl")
    rewards = [s for r in records for s in r["scores"]]
    ids, groups = [r["prompt_ids"] for r in records], [r["response_ids"] for r in records]
    ratios = None  # the base model is π_ref: log π_θ − log π_ref is 0 for every sample, no forward pass
    if trained:
        with ctx.compute():
            ratios = heldout.log_ratios(
                model, ctx.reference, ids, groups, pad_token_id=ctx.tokenizer.pad_token_id,
                batch_size=ec.logp_batch_size, temperature=ec.temperature,
                sampled_logps=[r["logps"] for r in records], mixed_precision=ctx.mixed_precision,
            )  # fmt: skip
    numbers = heldout.summary(rewards, heldout.clusters_of(groups), ratios)
    summary.update(
        reward_mean=numbers["reward"],
        reward_se=numbers["reward_se"],
        kl_mean=numbers["kl"],
        kl_se=numbers["kl_se"],
    )
    log_ratios = ratios if ratios is not None else [0.0] * len(rewards)
    if held_pairs:
        summary.update(agreement(ctx, model, held_pairs))
    write_json_atomic(out / "rewards.json", rewards)
    write_json_atomic(out / "kl.json", log_ratios)  # per sample: the one-seed claims pair them by prompt
    return summary


def agreement(ctx: Context, model, held: list[dict]) -> dict:
    """SimPO's diagnostic on held-out pairs: does the average log-likelihood order agree with the reward?"""
    bs, pad = ctx.cfg.eval.logp_batch_size, ctx.tokenizer.pad_token_id
    p_ids = [p["prompt_ids"] for p in held]
    pairs = [[p["chosen_ids"], p["rejected_ids"]] for p in held]  # the prompt encoded once per pair
    with ctx.compute():
        sums, lengths = score_groups(model, p_ids, pairs, pad_token_id=pad, batch_size=bs)
    cw, cl, nw, nl = sums[0::2], sums[1::2], lengths[0::2], lengths[1::2]
    return {
        "logp_agreement": M.avg_logp_agreement(cw.tolist(), nw.tolist(), cl.tolist(), nl.tolist()),
        "heldout_pairs": len(held),
    }


def agreement_se(summary: dict) -> float | None:
    """Standard error of an eval summary's avg-logp agreement, a share of its ``heldout_pairs`` pairs (one
    per prompt by default, so independent); None without one."""
    share, n = summary.get("logp_agreement"), summary.get("heldout_pairs")
    return None if share is None or not n else M.proportion_se(round(share * n), n)


def _heldout_pairs(ctx: Context, samples_file: Path) -> list[dict]:
    """Preference pairs on held-out prompts from the base model's samples (token ids kept)."""
    return pairs_with_ids(read_jsonl(samples_file), ctx.cfg.eval.pairs_mode)[0]


def result_row(ctx: Context, p: PlannedRun | None, seed: int, summary: dict, rewards, base_rewards) -> dict:
    """One result row (see :mod:`.report`) of one model and seed; ``p`` None is the base model."""
    clusters = [i // ctx.cfg.eval.samples_per_prompt for i in range(len(rewards))]  # prompt of each sample
    win, win_se = M.win_rate_and_se(rewards, base_rewards, clusters)
    base = p is None
    return {
        "method": "base" if base else p.run.method,
        "beta": None if base else p.beta,
        "reward_mean": summary["reward_mean"],
        "reward_se": summary["reward_se"],
        "kl_mean": 0.0 if base else summary["kl_mean"],
        "kl_se": 0.0 if base else summary["kl_se"],
        "win_rate": win,
        "logp_agreement": summary.get("logp_agreement"),
        "n_samples": len(rewards),
        "win_rate_se": win_se,
        "logp_agreement_se": agreement_se(summary),
        "heldout_pairs": summary.get("heldout_pairs"),
        "run": "base" if base else p.label,
        "seed": seed,
        "pairs": None if base else p.pairs_variant,
        "pairs_mode": None if base or p.pairs is None else p.pairs.mode,
        "n_pairs": None if base or p.pairs is None else ctx.read(p.pairs_stage)["summary"]["pairs"],
    }


def evaluate_seed(
    ctx: Context, seed: int, planned: list[PlannedRun], suffix: str, split: str = "heldout"
) -> list[dict]:
    """One seed's evaluations on the held-out prompts (stages ``eval/...``) or, with ``split``
    ``"validation"``, the same evaluations on the validation prompts (stages ``validation/...``): the base
    model, then every run of that seed against it. One result row per model."""
    folder = "eval" if split == "heldout" else split
    base_inputs = {
        "prompts": ctx.fp("prompts"),
        "model": ctx.model_id,
        "dtype": ctx.cfg.dtype,
        "eval": vars(ctx.cfg.eval),
        "seed": seed,
        "reward": ctx.reward_id,
        # the per-sample files the paired claims read (an evaluation cached without kl.json reruns)
        "per_sample": ["rewards.json", "kl.json"],
    }
    if split != "heldout":  # absent for held-out: their stages keep their fingerprints
        base_inputs["split"] = split

    def base_fn(out: Path) -> dict:
        summary = evaluate_model(ctx, ctx.base, out, None, seed, split)
        held = _heldout_pairs(ctx, out / "samples.jsonl")
        return {**summary, **(agreement(ctx, ctx.base, held) if held else {})}

    base = f"{folder}/base{suffix}"
    ctx.stage(base, base_inputs, base_fn)
    held = _heldout_pairs(ctx, ctx.root / base / "samples.jsonl")
    base_rewards = json.loads((ctx.root / base / "rewards.json").read_text())
    rows = [result_row(ctx, None, seed, ctx.read(base)["summary"], base_rewards, base_rewards)]
    for p in planned:
        model_dir = ctx.root / "train" / p.name / "run" / "model"
        inputs = {**base_inputs, "train": ctx.fp(f"train/{p.name}"), "base_eval": ctx.fp(base)}

        def fn(out: Path, model_dir=model_dir) -> dict:
            model = load_for_inference(str(model_dir), dtype=ctx.cfg.dtype).to(ctx.device).eval()
            return evaluate_model(ctx, model, out, held, seed, split)

        ctx.stage(f"{folder}/{p.name}", inputs, fn)
        rewards = json.loads((ctx.root / folder / p.name / "rewards.json").read_text())
        summary = ctx.read(f"{folder}/{p.name}")["summary"]
        rows.append(result_row(ctx, p, seed, summary, rewards, base_rewards))
    return rows


def evaluate_all(ctx: Context, planned: list[PlannedRun]) -> list[dict]:
    """Per seed: the base model (``eval/base``, ``eval/base-seed<s>`` with several seeds), then every run
    of that seed against it. One result row per (run, seed)."""
    seeds = experiment_seeds(ctx.cfg)
    rows = []
    for seed in seeds:
        rows += evaluate_seed(ctx, seed, [p for p in planned if p.seed == seed], seed_suffix(seed, seeds))
    return rows


def per_sample(ctx: Context, planned: list[PlannedRun]) -> dict[str, dict]:
    """One seed's per-sample held-out rewards and log-ratios per model (``eval/<run>/rewards.json``,
    ``kl.json``; ``kl`` None in an evaluation older than kl.json), keyed like the result rows' ``run``."""
    folders = {"base": ctx.root / "eval" / "base", **{p.label: ctx.root / "eval" / p.name for p in planned}}
    out = {}
    for key, folder in folders.items():
        kl = folder / "kl.json"
        out[key] = {
            "rewards": json.loads((folder / "rewards.json").read_text()),
            "kl": json.loads(kl.read_text()) if kl.is_file() else None,
        }
    return out


def tune(ctx: Context, planned: list[PlannedRun]) -> tuple[list[PlannedRun], list[dict]]:
    """Evaluate every candidate on the validation prompts (stages ``validation/...``, seed means with
    several seeds), choose one per run (:mod:`.tuning`), write ``tuning.csv`` / ``tuning.json`` (the base
    model's validation row, then every candidate's with ``group``, ``learning_rate``, ``gamma``,
    ``max_kl``, ``within_kl``, ``chosen``); returns the chosen candidates' planned runs (every seed) and the
    candidates' rows."""
    seeds = experiment_seeds(ctx.cfg)
    rows = []
    for seed in seeds:
        mine = [p for p in planned if p.seed == seed]
        rows += evaluate_seed(ctx, seed, mine, seed_suffix(seed, seeds), split="validation")
    if len(seeds) > 1:
        rows = aggregate_seeds(rows)
    by_label = {p.label: p for p in planned}
    base = [r for r in rows if r["run"] == "base"]
    candidates = [{**r, **_candidate_keys(ctx, by_label[r["run"]])} for r in rows if r["run"] != "base"]
    tuning = mark_chosen(candidates)
    write_results(ctx.root, base + tuning, name="tuning")
    chosen = [r for r in tuning if r["chosen"]]
    for r in chosen:
        bound = "within" if r["within_kl"] else "none within, lowest KL"
        ctx.log(
            f"[tune] {r['group']}: {r['run']} (validation reward {r['reward_mean']:.3f}, "
            f"KL {r['kl_mean']:.2f}; max KL {r['max_kl']:g}: {bound})"
        )
    labels = {r["run"] for r in chosen}
    return [p for p in planned if p.label in labels], tuning


def _candidate_keys(ctx: Context, p: PlannedRun) -> dict:
    return {
        "group": p.group,
        "learning_rate": p.run.training["learning_rate"],
        "gamma": p.run.options.get("gamma") if p.run.method == "simpo" else None,
        "max_kl": entry_tune(ctx.cfg, p.run).max_kl,
    }
