"""The controlled sentiment experiment: prompts -> samples -> scores -> pairs -> train -> evaluate -> report.

Each stage writes into ``<output_dir>/<stage>/`` and records the fingerprint of its inputs (config values and
the fingerprints of the stages it reads), so a rerun skips finished stages and a changed input reruns only
what depends on it. The stages, in order (each a function of a shared :class:`.context.Context`):

- :mod:`.data_stages`: ``prompts``, ``samples`` (scored), ``pairs`` / ``pairs-<variant>``, ``unpaired`` (KTO's
  records: each sample above / below its prompt's median reward);
- :mod:`.train_stages`: the learned ``reward_model`` (only for ``reward: learned``), then ``train/<run>`` per
  planned run, through :func:`preftune.training.train` — the same trainer, losses and log-prob path as
  ``preftune train``, with ``resume="auto"`` and the reference log-probs of the pairs in train()'s
  content-addressed cache under ``<output_dir>/cache/ref_logps`` (computed by the first run on a set of
  pairs, loaded by the others);
- :mod:`.evaluation`: with a ``tune`` section, every candidate on the validation prompts
  (``validation/...``, choosing one per run: :mod:`.tuning`); then ``eval/base`` and ``eval/<run>`` on the
  held-out prompts;
- the report (here): ``results.csv`` / ``.json``, ``claims.json`` (:mod:`.claims`), the plots, ``report.md``.

Seeds (``seeds: [0, 1, 2]``): the prompts, samples and pairs are shared (the data is fixed); each training
run and its evaluation is repeated per seed (``training.seed`` is the seed, the evaluation's sampling seed
derives from it), and so is the base model's evaluation, so that a trained model and the base model of one
seed are judged on samples drawn with the same random numbers. ``results.csv`` then holds one row per run with
the mean and standard error over seeds (``results_by_seed.csv`` the per-seed rows), and ``claims.json`` the
papers' claims decided from those numbers.

Tuning (a ``tune`` section, with ``prompts.validation_fraction`` > 0): a seeded share of the training prompts
is set aside as validation prompts (``prompts/validation.txt``; never sampled for pairs nor trained on), every
candidate setting of every run is trained (``train/<run>-lr<lr>``) and evaluated on them like the held-out
evaluation (``validation/...``), one candidate per run is chosen (written to ``tuning.csv`` / ``tuning.json``),
and only the chosen candidates are evaluated on the held-out prompts and reported.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..files import write_json_atomic
from .claims import (
    PROMPT,
    SEED,
    claims_markdown,
    evaluate_claims,
    format_claims,
    prompt_replicates,
    seed_replicates,
)
from .config import (
    LEARNED,
    UNPAIRED_STAGE,
    ExperimentConfig,
    PlannedRun,
    experiment_seeds,
    load_experiment_config,
    plan_runs,
)
from .context import Context
from .data_stages import pairs_stage, prompts_stage, samples_stage, unpaired_stage
from .evaluation import agreement_se, evaluate_all, per_sample, tune
from .report import (
    aggregate_seeds,
    format_table,
    plot_claims,
    plot_frontier,
    plot_training_curves,
    write_report_md,
    write_results,
)
from .train_stages import reward_model_stage, train_runs
from .tuning import tuning_markdown

__all__ = ["Context", "agreement_se", "load_experiment_config", "run_experiment"]


def run_experiment(cfg: ExperimentConfig, log=print) -> list[dict]:
    """Run (or continue) the whole experiment; returns the result rows as in results.json (seed means with
    several seeds)."""
    from ..training.signals import stop_signals

    with stop_signals():  # SIGTERM stops like Ctrl-C; a training stage stops after its current step
        return _run(cfg, log)


def _run(cfg: ExperimentConfig, log) -> list[dict]:
    started = time.time()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "experiment_config.json", _jsonable(cfg))
    ctx = Context(cfg, log)
    planned = plan_runs(cfg)
    prompts_stage(ctx)
    samples_stage(ctx)
    pairs_stage(ctx, cfg.pairs)  # always: the report describes the experiment's pairs
    variants = {p.pairs_variant: p.pairs for p in planned if p.pairs_variant is not None}
    for variant, pairs in variants.items():
        pairs_stage(ctx, pairs, variant)
    if any(p.data_stage == UNPAIRED_STAGE for p in planned):
        unpaired_stage(ctx)
    if any(p.run.reward == LEARNED for p in planned):
        reward_model_stage(ctx)
    train_runs(ctx, planned)
    tuning = None
    if cfg.tune is not None:  # every candidate judged on the validation prompts; only the chosen go on
        planned, tuning = tune(ctx, planned)
    rows = evaluate_all(ctx, planned)
    results, claims = write_report(ctx, rows, planned, tuning)
    log("\n" + format_table(results))
    if claims:
        log("\n" + format_claims(claims))
    log(
        f"\nresults in {root} (results.csv, results.json, claims.json, frontier.png, report.md"
        f"{', tuning.csv' if cfg.tune is not None else ''}) — "
        f"{time.time() - started:.0f}s"
    )
    return results


def write_report(
    ctx: Context, rows: list[dict], planned: list[PlannedRun], tuning: list[dict] | None = None
) -> tuple[list[dict], list[dict]]:
    """Write the results (seed means and SEs over seeds when there are several seeds, the per-seed rows
    beside them), the claims, the plots and report.md (with the tuning rows when there are some); returns
    ``(results, claims)``."""
    cfg, root = ctx.cfg, ctx.root
    seeds = experiment_seeds(cfg)
    results = rows
    if len(seeds) > 1:
        write_results(root, rows, name="results_by_seed")
        results = aggregate_seeds(rows)
    write_results(root, results)
    if len(seeds) > 1:  # paired per seed; with one seed, per held-out prompt
        claims = evaluate_claims(results, seed_replicates(rows), SEED)
    else:
        replicates = prompt_replicates(results, per_sample(ctx, planned), cfg.eval.samples_per_prompt)
        claims = evaluate_claims(results, replicates, PROMPT)
    write_json_atomic(root / "claims.json", claims)
    title = f"{cfg.name}: reward vs KL" + (f" (mean ± SE over {len(seeds)} seeds)" if len(seeds) > 1 else "")
    plot_frontier(results, root / "frontier.png", title=title)
    first = [p for p in planned if p.seed == seeds[0]]  # one seed's curves: the others look alike
    curves = {p.label: root / "train" / p.name / "run" / "metrics.jsonl" for p in first}
    images = ["frontier.png"]
    if curves:
        plot_training_curves(curves, root / "training_curves.png")
        images.append("training_curves.png")
    data_stages = sorted({p.pairs_stage for p in planned if p.pairs_stage} | {"pairs"})
    if any(p.data_stage == UNPAIRED_STAGE for p in planned):
        data_stages.append(UNPAIRED_STAGE)
    summary = {
        "model": ctx.model_path,
        "reward": cfg.reward,
        "seeds": seeds,
        "standard errors": (
            f"over the {len(seeds)} seeds (sample std / √{len(seeds)})"
            if len(seeds) > 1
            else "one seed: over held-out samples, clustered by prompt"
        ),
        **{stage: ctx.read(stage)["summary"] for stage in data_stages},
        "sampling": ctx.read("samples")["summary"],
    }
    sections = {"Claims": claims_markdown(claims, plot_claims(root, claims))}
    if tuning is not None:
        sections["Tuning (validation prompts)"] = tuning_markdown(tuning)
    write_report_md(root, results, summary, images, sections=sections)
    return results, claims


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
