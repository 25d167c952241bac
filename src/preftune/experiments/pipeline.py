"""The controlled sentiment experiment: prompts -> samples -> scores -> pairs -> train -> evaluate -> report.

Each stage writes into ``<output_dir>/<stage>/`` and records the fingerprint of its inputs (config values and
the fingerprints of the stages it reads), so a rerun skips finished stages and a changed input reruns only
what depends on it. Training goes through :func:`preftune.training.train` — the same trainer, losses and
log-prob path as ``preftune train``. The reference log-probs of the pairs are computed once (stage
``reference``) and handed to every run, since every method trains on the same pairs against the same
starting model.

Evaluation (per model, on held-out prompts): N samples per prompt at the sampling temperature; mean reward
± standard error; KL(π_θ‖π_ref) estimated from the same samples as the mean of log π_θ(y|x) − log π_ref(y|x)
(on the sampled token ids, not re-tokenised text); win rate against the base model's samples (same prompt
and slot, reward as judge); and SimPO's diagnostic: the share of held-out preference pairs (built from the
base model's held-out samples) whose average log-likelihood ordering under the model agrees with the
reward ordering.

Seeds (``seeds: [0, 1, 2]``): the prompts, samples and pairs are shared (the data is fixed); each training
run and its evaluation is repeated per seed (``training.seed`` is the seed, the evaluation's sampling seed
derives from it), and so is the base model's evaluation, so that a trained model and the base model of one
seed are judged on samples drawn with the same random numbers. ``results.csv`` then holds one row per run with
the mean and standard error over seeds (``results_by_seed.csv`` the per-seed rows), and ``claims.json`` the
papers' claims decided from those numbers (:mod:`preftune.experiments.claims`).

Tuning (a ``tune`` section, with ``prompts.validation_fraction`` > 0): a seeded share of the training prompts
is set aside as validation prompts (``prompts/validation.txt``; never sampled for pairs nor trained on), every
candidate setting of every run is trained (``train/<run>-lr<lr>``) and evaluated on them like the held-out
evaluation (``validation/...``), one candidate per run is chosen (:mod:`preftune.experiments.tuning`, written to
``tuning.csv`` / ``tuning.json``), and only the chosen candidates are evaluated on the held-out prompts and
reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import metrics as M
from ..config import TrainConfig
from ..files import read_jsonl, write_json_atomic, write_jsonl_atomic
from ..logprobs import score_groups
from ..losses import PAIR_METHODS
from ..models import (
    autocast,
    default_device,
    load_for_inference,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from ..rewards import RewardError, load_reward
from ..sampling import derive_seed, generation_kwargs, sample_responses
from ..training.checkpoint import latest_checkpoint
from ..training.reference import needs_reference
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
    REWARD_MODEL_STAGE,
    ExperimentConfig,
    PairsConfig,
    PlannedRun,
    entry_tune,
    experiment_seeds,
    load_experiment_config,
    plan_runs,
    reward_model_config,
    seed_suffix,
    stage_with_variant,
    train_config,
    train_dtype,
)
from .fingerprints import code_fingerprint, folder_fingerprint, reward_fingerprint, text_sha256
from .pairs import build_pairs, subsample_pairs
from .prompts import load_prompts, split_validation
from .report import (
    aggregate_seeds,
    format_table,
    plot_claims,
    plot_frontier,
    plot_training_curves,
    write_report_md,
    write_results,
)
from .stages import read_stage, run_stage
from .tuning import mark_chosen, tuning_markdown

__all__ = ["load_experiment_config", "run_experiment"]


def pairs_with_ids(records: list[dict], mode: str) -> tuple[list[dict], dict]:
    """Preference pairs from scored samples, each row carrying the sampled token ids beside the texts
    (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), so training and evaluation see exactly the tokens
    the model sampled rather than a re-tokenisation of the decoded text."""
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


def probe_config(cfg: ExperimentConfig, p: PlannedRun) -> TrainConfig:
    """A run's training config with no absolute paths (what its fingerprint holds: folders stay movable)."""
    return train_config(cfg, p.run, p.beta, output_dir="run", seed=p.seed)


def uses_pair_reference(tcfg: TrainConfig) -> bool:
    """Whether a run reads the shared reference log-probs of the pairs (a pair method with π_ref)."""
    return tcfg.method in PAIR_METHODS and needs_reference(tcfg)


class Experiment:
    def __init__(self, cfg: ExperimentConfig, log=print):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.log = log
        self.model_path = resolve_model_path(cfg.model, log)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model_id = folder_fingerprint(self.model_path)
        # loaded now: a missing module, function or reward-model folder is an error before any sampling
        self.reward = load_reward(cfg.reward)
        self.reward_id = reward_fingerprint(cfg.reward)
        self.device = default_device()
        self._base = None
        self.tuning: list[dict] | None = None  # every candidate's validation row, once `tune` has run

    # -- shared resources ---------------------------------------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            self._base = load_model(self.model_path, dtype=self.cfg.dtype).to(self.device).eval()
        return self._base

    def _fp(self, name: str) -> str:
        return self._read(name)["fingerprint"]

    def _read(self, name: str) -> dict:
        """stage.json of a stage; nested names (``train/dpo-beta0.1``) live in sub-folders."""
        path = self.root / name
        return read_stage(path.parent, path.name)

    def _stage(self, name: str, inputs: dict, fn, *, resumable: bool = False) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        inputs = {**inputs, "code": code_fingerprint()}
        out, _ = run_stage(path.parent, path.name, inputs, fn, log=self.log, resumable=resumable)
        return out

    # -- stages -------------------------------------------------------------------------------------------
    def prompts(self) -> None:
        p = self.cfg.prompts
        files = {  # the prompts by content, built-in lists included
            split: text_sha256("\n".join(load_prompts(path, split)))
            for split, path in (("train", p.train_file), ("heldout", p.heldout_file))
        }

        validation_seed = derive_seed(self.cfg.seed, "validation")

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
        self._stage("prompts", inputs, fn)

    def _read_prompts(self, split: str) -> list[str]:
        return (self.root / "prompts" / f"{split}.txt").read_text().splitlines()

    def _sample(self, model, prompts: list[str], out: Path, *, k: int, sc, seed: int) -> dict:
        started = time.time()
        samples = sample_responses(
            model,
            self.tokenizer,
            prompts,
            k=k,
            **generation_kwargs(sc),
            seed=seed,
            progress=self.cfg.progress,
        )
        flat_prompts, flat_responses = samples.flat()
        scores = self.reward(flat_prompts, flat_responses, samples.flat_ids())
        if None in scores:
            raise RewardError(
                f"reward {self.reward.name!r} gave no score (None) for a sample; the experiment needs one"
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

    def samples(self) -> None:
        sc = self.cfg.sample
        inputs = {
            "prompts": self._fp("prompts"),
            "model": self.model_id,
            "dtype": self.cfg.dtype,
            "sample": vars(sc),
            "seed": self.cfg.seed,
            "reward": self.reward_id,
        }
        self._stage(
            "samples",
            inputs,
            lambda out: self._sample(
                self.base,
                self._read_prompts("train"),
                out,
                k=sc.k,
                sc=sc,
                seed=derive_seed(self.cfg.seed, "samples"),
            ),
        )

    def pairs(self, pairs: PairsConfig, variant: str | None = None) -> None:
        """One stage per pairs setting: ``pairs`` (the experiment's) or ``pairs-<variant>`` (a methods entry's
        own), fingerprinted by the setting; a capped setting keeps a fixed random subset of the pairs."""

        def fn(out: Path) -> dict:
            records = read_jsonl(self.root / "samples" / "samples.jsonl")
            rows, stats = pairs_with_ids(records, pairs.mode)
            kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
            stats["empty_dropped"] = len(rows) - len(kept)
            if not kept:
                raise RuntimeError(f"no preference pairs: every prompt's responses tied ({stats})")
            if pairs.max_pairs is not None:
                stats["pairs_before_cap"] = len(kept)
                kept = subsample_pairs(kept, pairs.max_pairs, derive_seed(self.cfg.seed, "pairs"))
            stats["pairs"] = len(kept)
            write_jsonl_atomic(out / "pairs.jsonl", kept)
            return stats

        inputs = {"samples": self._fp("samples"), "mode": pairs.mode, "format": "with-token-ids"}
        if pairs.max_pairs is not None:  # absent otherwise: uncapped stages keep their earlier fingerprints
            inputs.update(max_pairs=pairs.max_pairs, subset_seed=self.cfg.seed)
        self._stage(stage_with_variant("pairs", variant), inputs, fn)

    def reference(self, pairs_stage: str = "pairs", name: str = "reference") -> None:
        """Reference log-probs of every pair of one pairs stage under the starting model, shared by all runs
        on those pairs."""
        from ..data import load_rows, tokenize_rows, validate_rows
        from ..training.reference import build_reference, pair_reference_logps, save_pair_logps

        t = self.cfg.train
        dtype = train_dtype(self.cfg)  # computed like the training runs: their weights, their autocast

        def fn(out: Path) -> dict:
            rows = load_rows(self.root / pairs_stage / "pairs.jsonl")
            validate_rows(rows)
            examples, _ = tokenize_rows(
                rows, self.tokenizer, max_length=t.max_length, max_prompt_length=t.max_prompt_length
            )
            started = time.time()
            model = (
                self.base
                if dtype == self.cfg.dtype
                else load_model(self.model_path, dtype=dtype).to(self.device)
            )
            reference = build_reference(model, during_training=False)
            pad = self.tokenizer.pad_token_id
            with autocast(t.mixed_precision, self.device):
                ref = pair_reference_logps(
                    reference, examples, pad, self.cfg.eval.logp_batch_size
                )  # shared prefix
            save_pair_logps(out / "ref_logps.safetensors", {"train": ref})
            return {"pairs": len(examples), "seconds": time.time() - started}

        inputs = {
            "pairs": self._fp(pairs_stage),
            "model": self.model_id,
            "dtype": dtype,
            "mixed_precision": t.mixed_precision,
            "max_length": t.max_length,
            "max_prompt_length": t.max_prompt_length,
        }
        self._stage(name, inputs, fn)

    def _train_stage(
        self, name: str, make_cfg, data: str, inputs: dict, ref_file: Path | None = None
    ) -> None:
        """Stage ``name``: ``preftune train`` with the config ``make_cfg(output_dir)`` on ``<root>/<data>`` from
        the experiment's model, resuming after a Ctrl-C; fingerprinted by ``inputs`` and the config."""
        from ..training import train

        config = make_cfg("run").to_dict()  # no absolute paths: run folders stay movable
        config["training"].pop("progress")  # display only
        inputs = {"model": self.model_id, "config": config, **inputs}

        def fn(out: Path) -> dict:
            tcfg = make_cfg(str(out / "run"))
            tcfg.data.train = str(self.root / data)
            tcfg.model.name_or_path = self.model_path
            if (out / "run" / "result.json").is_file():  # finished, then stopped by a signal
                return json.loads((out / "run" / "result.json").read_text())
            resume = latest_checkpoint(out / "run") is not None  # after a Ctrl-C in this stage
            self.log(f"== training {name}" + (" (resuming)" if resume else ""))
            train(tcfg, resume=resume, overwrite=not resume, ref_logps_file=ref_file, log=self.log)
            return json.loads((out / "run" / "result.json").read_text())

        self._stage(name, inputs, fn, resumable=True)

    def reward_model(self) -> None:
        """The learned reward model (RLHF's): Bradley–Terry on the experiment's pairs, from the base model.
        Online runs with `reward: learned` train against it; every model is still evaluated with the
        experiment's reward."""
        make = lambda output_dir: reward_model_config(self.cfg, output_dir=output_dir)  # noqa: E731
        self._train_stage(REWARD_MODEL_STAGE, make, "pairs/pairs.jsonl", {"pairs": self._fp("pairs")})

    def train_runs(self, planned: list[PlannedRun]) -> None:
        for p in planned:
            if p.pairs_stage is None:  # trained online: the prompts and the reward, not the pairs
                inputs = {"prompts": self._fp("prompts"), "reward": self.reward_id}
                if p.run.reward == LEARNED:
                    inputs["reward_model"] = self._fp(REWARD_MODEL_STAGE)
            else:
                inputs = {"pairs": self._fp(p.pairs_stage)}
            ref = None
            if uses_pair_reference(probe_config(self.cfg, p)):
                inputs["reference"] = self._fp(p.reference_stage)
                ref = self.root / p.reference_stage / "ref_logps.safetensors"
            data = "prompts/train.txt" if p.pairs_stage is None else f"{p.pairs_stage}/pairs.jsonl"
            make = lambda output_dir, p=p: train_config(  # noqa: E731
                self.cfg, p.run, p.beta, output_dir=output_dir, seed=p.seed
            )
            self._train_stage(f"train/{p.name}", make, data, inputs, ref)

    def _evaluate(
        self, model, out: Path, held_pairs: list[dict] | None, seed: int, split: str = "heldout"
    ) -> dict:
        ec = self.cfg.eval
        seed = derive_seed(seed, "eval")  # its own stream: never the training samples' seeds
        summary = self._sample(
            model, self._read_prompts(split), out, k=ec.samples_per_prompt, sc=ec, seed=seed
        )
        records = read_jsonl(out / "samples.jsonl")
        rewards = [s for r in records for s in r["scores"]]
        clusters = [i for i, r in enumerate(records) for _ in r["response_ids"]]  # samples of one prompt
        pad = self.tokenizer.pad_token_id
        bs = ec.logp_batch_size
        summary.update(dict(zip(("reward_mean", "reward_se"), M.mean_and_se(rewards, clusters))))
        if model is self.base:  # log π_θ − log π_ref is 0 for every sample: no forward pass needed
            summary.update(kl_mean=0.0, kl_se=0.0)
            log_ratios = [0.0] * len(rewards)
        else:
            # each prompt encoded once for its samples
            ids, groups = [r["prompt_ids"] for r in records], [r["response_ids"] for r in records]
            policy_logps, _ = score_groups(model, ids, groups, pad_token_id=pad, batch_size=bs)
            ref_logps, _ = score_groups(self.base, ids, groups, pad_token_id=pad, batch_size=bs)
            kl = M.sequence_kl(policy_logps.tolist(), ref_logps.tolist(), clusters)
            log_ratios = [a - b for a, b in zip(policy_logps.tolist(), ref_logps.tolist())]
            summary.update(kl_mean=kl[0], kl_se=kl[1])
        if held_pairs:
            summary.update(self._agreement(model, held_pairs))
        write_json_atomic(out / "rewards.json", rewards)
        write_json_atomic(out / "kl.json", log_ratios)  # per sample: the one-seed claims pair them by prompt
        return summary

    def _heldout_pairs(self, samples_file: Path) -> list[dict]:
        """Preference pairs on held-out prompts from the base model's samples (token ids kept)."""
        return pairs_with_ids(read_jsonl(samples_file), self.cfg.eval.pairs_mode)[0]

    def evaluate_all(self, planned: list[PlannedRun]) -> list[dict]:
        """Per seed: the base model (``eval/base``, ``eval/base-seed<s>`` with several seeds), then every run
        of that seed against it. One result row per (run, seed)."""
        seeds = experiment_seeds(self.cfg)
        rows = []
        for seed in seeds:
            rows += self._evaluate_seed(
                seed, [p for p in planned if p.seed == seed], seed_suffix(seed, seeds)
            )
        return rows

    def _evaluate_seed(
        self, seed: int, planned: list[PlannedRun], suffix: str, split: str = "heldout"
    ) -> list[dict]:
        """One seed's evaluations on the held-out prompts (stages ``eval/...``) or, with ``split``
        ``"validation"``, the same evaluations on the validation prompts (stages ``validation/...``)."""
        folder = "eval" if split == "heldout" else split
        base_inputs = {
            "prompts": self._fp("prompts"),
            "model": self.model_id,
            "dtype": self.cfg.dtype,
            "eval": vars(self.cfg.eval),
            "seed": seed,
            "reward": self.reward_id,
            # the per-sample files the paired claims read (an evaluation cached without kl.json reruns)
            "per_sample": ["rewards.json", "kl.json"],
        }
        if split != "heldout":  # absent for held-out: their stages keep their fingerprints
            base_inputs["split"] = split

        def base_fn(out: Path) -> dict:
            summary = self._evaluate(self.base, out, None, seed, split)
            held = self._heldout_pairs(out / "samples.jsonl")
            return {**summary, **(self._agreement(self.base, held) if held else {})}

        base = f"{folder}/base{suffix}"
        self._stage(base, base_inputs, base_fn)
        held = self._heldout_pairs(self.root / base / "samples.jsonl")
        base_rewards = json.loads((self.root / base / "rewards.json").read_text())
        rows = [self._row(None, seed, self._read(base)["summary"], base_rewards, base_rewards)]
        for p in planned:
            model_dir = self.root / "train" / p.name / "run" / "model"
            inputs = {**base_inputs, "train": self._fp(f"train/{p.name}"), "base_eval": self._fp(base)}

            def fn(out: Path, model_dir=model_dir) -> dict:
                model = load_for_inference(str(model_dir), dtype=self.cfg.dtype).to(self.device).eval()
                return self._evaluate(model, out, held, seed, split)

            self._stage(f"{folder}/{p.name}", inputs, fn)
            rewards = json.loads((self.root / folder / p.name / "rewards.json").read_text())
            summary = self._read(f"{folder}/{p.name}")["summary"]
            rows.append(self._row(p, seed, summary, rewards, base_rewards))
        return rows

    def tune(self, planned: list[PlannedRun]) -> list[PlannedRun]:
        """Evaluate every candidate on the validation prompts (stages ``validation/...``, seed means with
        several seeds), choose one per run (:mod:`.tuning`), write ``tuning.csv`` / ``tuning.json`` (the base
        model's validation row, then every candidate's with ``group``, ``learning_rate``, ``gamma``,
        ``max_kl``, ``within_kl``, ``chosen``); returns the chosen candidates' planned runs, every seed."""
        seeds = experiment_seeds(self.cfg)
        rows = []
        for seed in seeds:
            mine = [p for p in planned if p.seed == seed]
            rows += self._evaluate_seed(seed, mine, seed_suffix(seed, seeds), split="validation")
        if len(seeds) > 1:
            rows = aggregate_seeds(rows)
        by_label = {p.label: p for p in planned}
        base = [r for r in rows if r["run"] == "base"]
        candidates = [{**r, **self._candidate_keys(by_label[r["run"]])} for r in rows if r["run"] != "base"]
        self.tuning = mark_chosen(candidates)
        write_results(self.root, base + self.tuning, name="tuning")
        chosen = [r for r in self.tuning if r["chosen"]]
        for r in chosen:
            bound = "within" if r["within_kl"] else "none within, lowest KL"
            self.log(
                f"[tune] {r['group']}: {r['run']} (validation reward {r['reward_mean']:.3f}, "
                f"KL {r['kl_mean']:.2f}; max KL {r['max_kl']:g}: {bound})"
            )
        labels = {r["run"] for r in chosen}
        return [p for p in planned if p.label in labels]

    def _candidate_keys(self, p: PlannedRun) -> dict:
        return {
            "group": p.group,
            "learning_rate": p.run.training["learning_rate"],
            "gamma": p.run.options.get("gamma") if p.run.method == "simpo" else None,
            "max_kl": entry_tune(self.cfg, p.run).max_kl,
        }

    def _agreement(self, model, held: list[dict]) -> dict:
        """SimPO's diagnostic on held-out pairs: does the average log-likelihood order agree with the reward?"""
        bs, pad = self.cfg.eval.logp_batch_size, self.tokenizer.pad_token_id
        p_ids = [p["prompt_ids"] for p in held]
        pairs = [[p["chosen_ids"], p["rejected_ids"]] for p in held]  # the prompt encoded once per pair
        sums, lengths = score_groups(model, p_ids, pairs, pad_token_id=pad, batch_size=bs)
        cw, cl, nw, nl = sums[0::2], sums[1::2], lengths[0::2], lengths[1::2]
        return {
            "logp_agreement": M.avg_logp_agreement(cw.tolist(), nw.tolist(), cl.tolist(), nl.tolist()),
            "heldout_pairs": len(held),
        }

    def _row(self, p: PlannedRun | None, seed: int, summary: dict, rewards, base_rewards) -> dict:
        """One result row (see :mod:`.report`) of one model and seed; ``p`` None is the base model."""
        clusters = [
            i // self.cfg.eval.samples_per_prompt for i in range(len(rewards))
        ]  # prompt of each sample
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
            "n_pairs": None if base or p.pairs is None else self._read(p.pairs_stage)["summary"]["pairs"],
        }

    def _per_sample(self, planned: list[PlannedRun]) -> dict[str, dict]:
        """One seed's per-sample held-out rewards and log-ratios per model (``eval/<run>/rewards.json``,
        ``kl.json``; ``kl`` None in an evaluation older than kl.json), keyed like the result rows' ``run``."""
        folders = {
            "base": self.root / "eval" / "base",
            **{p.label: self.root / "eval" / p.name for p in planned},
        }
        out = {}
        for key, folder in folders.items():
            kl = folder / "kl.json"
            out[key] = {
                "rewards": json.loads((folder / "rewards.json").read_text()),
                "kl": json.loads(kl.read_text()) if kl.is_file() else None,
            }
        return out

    def report(self, rows: list[dict], planned: list[PlannedRun]) -> tuple[list[dict], list[dict]]:
        """Write the results (seed means and SEs over seeds when there are several seeds, the per-seed rows
        beside them), the claims, the plots and report.md; returns ``(results, claims)``."""
        seeds = experiment_seeds(self.cfg)
        results = rows
        if len(seeds) > 1:
            write_results(self.root, rows, name="results_by_seed")
            results = aggregate_seeds(rows)
        write_results(self.root, results)
        if len(seeds) > 1:  # paired per seed; with one seed, per held-out prompt
            claims = evaluate_claims(results, seed_replicates(rows), SEED)
        else:
            per_sample = self._per_sample(planned)
            replicates = prompt_replicates(results, per_sample, self.cfg.eval.samples_per_prompt)
            claims = evaluate_claims(results, replicates, PROMPT)
        write_json_atomic(self.root / "claims.json", claims)
        title = f"{self.cfg.name}: reward vs KL" + (
            f" (mean ± SE over {len(seeds)} seeds)" if len(seeds) > 1 else ""
        )
        plot_frontier(results, self.root / "frontier.png", title=title)
        first = [p for p in planned if p.seed == seeds[0]]  # one seed's curves: the others look alike
        curves = {p.label: self.root / "train" / p.name / "run" / "metrics.jsonl" for p in first}
        images = ["frontier.png"]
        if curves:
            plot_training_curves(curves, self.root / "training_curves.png")
            images.append("training_curves.png")
        pairs_stages = sorted({p.pairs_stage for p in planned if p.pairs_stage} | {"pairs"})
        summary = {
            "model": self.model_path,
            "reward": self.cfg.reward,
            "seeds": seeds,
            "standard errors": (
                f"over the {len(seeds)} seeds (sample std / √{len(seeds)})"
                if len(seeds) > 1
                else "one seed: over held-out samples, clustered by prompt"
            ),
            **{stage: self._read(stage)["summary"] for stage in pairs_stages},
            "sampling": self._read("samples")["summary"],
        }
        sections = {"Claims": claims_markdown(claims, plot_claims(self.root, claims))}
        if self.tuning is not None:
            sections["Tuning (validation prompts)"] = tuning_markdown(self.tuning)
        write_report_md(self.root, results, summary, images, sections=sections)
        return results, claims


def agreement_se(summary: dict) -> float | None:
    """Standard error of an eval summary's avg-logp agreement, a share of its ``heldout_pairs`` pairs (one
    per prompt by default, so independent); None without one."""
    share, n = summary.get("logp_agreement"), summary.get("heldout_pairs")
    return None if share is None or not n else M.proportion_se(round(share * n), n)


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
    exp = Experiment(cfg, log)
    planned = plan_runs(cfg)
    exp.prompts()
    exp.samples()
    exp.pairs(cfg.pairs)  # always: the report describes the experiment's pairs
    variants = {p.pairs_variant: p.pairs for p in planned if p.pairs_variant is not None}
    for variant, pairs in variants.items():
        exp.pairs(pairs, variant)
    references = {
        (p.pairs_stage, p.reference_stage) for p in planned if uses_pair_reference(probe_config(cfg, p))
    }
    for stage, reference in sorted(references):
        exp.reference(stage, reference)
    if any(p.run.reward == LEARNED for p in planned):
        exp.reward_model()
    exp.train_runs(planned)
    if cfg.tune is not None:  # every candidate judged on the validation prompts; only the chosen go on
        planned = exp.tune(planned)
    rows = exp.evaluate_all(planned)
    results, claims = exp.report(rows, planned)
    log("\n" + format_table(results))
    if claims:
        log("\n" + format_claims(claims))
    log(
        f"\nresults in {root} (results.csv, results.json, claims.json, frontier.png, report.md"
        f"{', tuning.csv' if cfg.tune is not None else ''}) — "
        f"{time.time() - started:.0f}s"
    )
    return results


def _jsonable(cfg) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
