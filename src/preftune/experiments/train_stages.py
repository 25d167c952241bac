"""The experiment's training stages: ``train/<run>`` per planned run and the learned ``reward_model``. Each is
:func:`preftune.training.train` (the same trainer, losses and log-prob path as ``preftune train``) with
``resume="auto"``: a stage stopped by Ctrl-C or SIGTERM resumes from its checkpoint on the next run. The
precomputed reference log-probs of the pairs go to train()'s content-addressed cache in the experiment's
folder (``cache/ref_logps``): the first run on a set of pairs computes them, every other run on those pairs
(another method, β or seed) loads them."""

from __future__ import annotations

import json
from pathlib import Path

from .config import LEARNED, REWARD_MODEL_STAGE, UNPAIRED_STAGE, PlannedRun, reward_model_config, train_config
from .context import Context

REF_CACHE = "cache/ref_logps"  # under the experiment's folder


def train_stage(ctx: Context, name: str, make_cfg, data: str, inputs: dict) -> None:
    """Stage ``name``: ``preftune train`` with the config ``make_cfg(output_dir)`` on ``<root>/<data>`` from
    the experiment's model, resuming after a Ctrl-C; fingerprinted by ``inputs`` and the config."""
    from ..training import train

    # what trains (unset method keys as filled in); no absolute paths: run folders stay movable
    config = make_cfg("run").to_dict(resolved=True)
    for key in ("progress", "reshard_after_forward"):  # display; fsdp's memory against speed: the same steps
        config["training"].pop(key)
    inputs = {"model": ctx.model_id, "config": config, **inputs}

    def fn(out: Path) -> dict:
        tcfg = make_cfg(str(out / "run"))
        tcfg.data.train = str(ctx.root / data)
        tcfg.model.name_or_path = ctx.model_path
        ctx.log(f"== training {name}")
        run = train(tcfg, resume="auto", ref_cache_dir=ctx.root / REF_CACHE, log=ctx.log)
        return json.loads((Path(run) / "result.json").read_text())

    ctx.stage(name, inputs, fn, resumable=True)


def reward_model_stage(ctx: Context) -> None:
    """The learned reward model (RLHF's): Bradley–Terry on the experiment's pairs, from the base model.
    Online runs with `reward: learned` train against it; every model is still evaluated with the
    experiment's reward."""
    make = lambda output_dir: reward_model_config(ctx.cfg, output_dir=output_dir)  # noqa: E731
    train_stage(ctx, REWARD_MODEL_STAGE, make, "pairs/pairs.jsonl", {"pairs": ctx.fp("pairs")})


def train_runs(ctx: Context, planned: list[PlannedRun]) -> None:
    """Every planned run's ``train/<name>`` stage, on the data its method trains on (:attr:`PlannedRun.data_stage`)."""
    for p in planned:
        if p.data_stage == "prompts":  # trained online: the prompts and the reward, not the pairs
            inputs = {"prompts": ctx.fp("prompts"), "reward": ctx.reward_id}
            if p.run.reward == LEARNED:
                inputs["reward_model"] = ctx.fp(REWARD_MODEL_STAGE)
        elif p.data_stage == UNPAIRED_STAGE:  # kto on the median-labelled samples
            inputs = {"unpaired": ctx.fp(UNPAIRED_STAGE)}
        else:
            inputs = {"pairs": ctx.fp(p.pairs_stage)}
        make = lambda output_dir, p=p: train_config(  # noqa: E731
            ctx.cfg, p.run, p.beta, output_dir=output_dir, seed=p.seed
        )
        train_stage(ctx, f"train/{p.name}", make, p.data_file, inputs)
