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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import metrics as M
from ..config import ONLINE_METHODS, TrainConfig
from ..files import read_jsonl, write_json_atomic, write_jsonl_atomic
from ..logprobs import score_responses
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
from .config import ExperimentConfig, MethodRun, load_experiment_config, run_name, train_config, train_dtype
from .fingerprints import code_fingerprint, folder_fingerprint, reward_fingerprint, text_sha256
from .pairs import build_pairs
from .prompts import load_prompts
from .report import format_table, plot_frontier, plot_training_curves, write_report_md, write_results
from .stages import read_stage, run_stage

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

        def fn(out: Path) -> dict:
            train = load_prompts(p.train_file, "train")[: p.n_train]
            held = load_prompts(p.heldout_file, "heldout")[: p.n_heldout]
            (out / "train.txt").write_text("\n".join(train) + "\n")
            (out / "heldout.txt").write_text("\n".join(held) + "\n")
            return {"train": len(train), "heldout": len(held)}

        self._stage("prompts", {"files": files, "n_train": p.n_train, "n_heldout": p.n_heldout}, fn)

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

    def pairs(self) -> None:
        def fn(out: Path) -> dict:
            records = read_jsonl(self.root / "samples" / "samples.jsonl")
            rows, stats = pairs_with_ids(records, self.cfg.pairs.mode)
            kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
            stats["empty_dropped"] = len(rows) - len(kept)
            stats["pairs"] = len(kept)
            if not kept:
                raise RuntimeError(f"no preference pairs: every prompt's responses tied ({stats})")
            write_jsonl_atomic(out / "pairs.jsonl", kept)
            return stats

        inputs = {"samples": self._fp("samples"), "mode": self.cfg.pairs.mode, "format": "with-token-ids"}
        self._stage("pairs", inputs, fn)

    def _train_cfg(self, run: MethodRun, beta: float, output_dir: Path) -> TrainConfig:
        tcfg = train_config(self.cfg, run, beta, output_dir=str(output_dir))
        online = run.method in ONLINE_METHODS
        tcfg.data.train = str(self.root / ("prompts/train.txt" if online else "pairs/pairs.jsonl"))
        tcfg.model.name_or_path = self.model_path
        return tcfg

    def reference(self) -> None:
        """Reference log-probs of every pair under the starting model, shared by all runs."""
        from ..data import load_rows, tokenize_rows, validate_rows
        from ..training.reference import build_reference, pair_reference_logps, save_pair_logps

        t = self.cfg.train
        dtype = train_dtype(self.cfg)  # computed like the training runs: their weights, their autocast

        def fn(out: Path) -> dict:
            rows = load_rows(self.root / "pairs" / "pairs.jsonl")
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
            "pairs": self._fp("pairs"),
            "model": self.model_id,
            "dtype": dtype,
            "mixed_precision": t.mixed_precision,
            "max_length": t.max_length,
            "max_prompt_length": t.max_prompt_length,
        }
        self._stage("reference", inputs, fn)

    def train_runs(self) -> list[tuple[str, MethodRun, float]]:
        from ..training import train

        done = []
        for run in self.cfg.methods:
            for beta in run.betas:
                name = run_name(run, beta)
                stage = f"train/{name}"
                probe = train_config(self.cfg, run, beta, output_dir="run")  # no absolute paths: movable
                config = probe.to_dict()
                config["training"].pop("progress")  # display only
                inputs = {"model": self.model_id, "config": config}
                if run.method in ONLINE_METHODS:  # trained online: the prompts and the reward, not the pairs
                    inputs.update(prompts=self._fp("prompts"), reward=self.reward_id)
                else:
                    inputs["pairs"] = self._fp("pairs")
                if uses_pair_reference(probe):
                    inputs["reference"] = self._fp("reference")

                def fn(out: Path, run=run, beta=beta) -> dict:
                    tcfg = self._train_cfg(run, beta, out / "run")
                    shared = self.root / "reference" / "ref_logps.safetensors"
                    ref = shared if uses_pair_reference(tcfg) else None
                    if (out / "run" / "result.json").is_file():  # finished, then stopped by a signal
                        return json.loads((out / "run" / "result.json").read_text())
                    resume = latest_checkpoint(out / "run") is not None  # after a Ctrl-C in this stage
                    self.log(f"== training {run_name(run, beta)}" + (" (resuming)" if resume else ""))
                    train(tcfg, resume=resume, overwrite=not resume, ref_logps_file=ref, log=self.log)
                    return json.loads((out / "run" / "result.json").read_text())

                self._stage(stage, inputs, fn, resumable=True)
                done.append((name, run, beta))
        return done

    def _evaluate(self, model, out: Path, held_pairs: list[dict] | None) -> dict:
        ec = self.cfg.eval
        seed = derive_seed(self.cfg.seed, "eval")  # its own stream: never the training samples' seeds
        summary = self._sample(
            model, self._read_prompts("heldout"), out, k=ec.samples_per_prompt, sc=ec, seed=seed
        )
        records = read_jsonl(out / "samples.jsonl")
        prompts = [r["prompt_ids"] for r in records for _ in r["response_ids"]]
        responses = [ids for r in records for ids in r["response_ids"]]
        rewards = [s for r in records for s in r["scores"]]
        clusters = [i for i, r in enumerate(records) for _ in r["response_ids"]]  # samples of one prompt
        pad = self.tokenizer.pad_token_id
        bs = ec.logp_batch_size
        summary.update(dict(zip(("reward_mean", "reward_se"), M.mean_and_se(rewards, clusters))))
        if model is self.base:  # log π_θ − log π_ref is 0 for every sample: no forward pass needed
            summary.update(kl_mean=0.0, kl_se=0.0)
        else:
            policy_logps, _ = score_responses(model, prompts, responses, pad_token_id=pad, batch_size=bs)
            ref_logps, _ = score_responses(self.base, prompts, responses, pad_token_id=pad, batch_size=bs)
            kl = M.sequence_kl(policy_logps.tolist(), ref_logps.tolist(), clusters)
            summary.update(kl_mean=kl[0], kl_se=kl[1])
        if held_pairs:
            summary.update(self._agreement(model, held_pairs))
        write_json_atomic(out / "rewards.json", rewards)
        return summary

    def _heldout_pairs(self, samples_file: Path) -> list[dict]:
        """Preference pairs on held-out prompts from the base model's samples (token ids kept)."""
        return pairs_with_ids(read_jsonl(samples_file), self.cfg.eval.pairs_mode)[0]

    def evaluate_all(self, runs) -> list[dict]:
        ec = self.cfg.eval
        base_inputs = {
            "prompts": self._fp("prompts"),
            "model": self.model_id,
            "dtype": self.cfg.dtype,
            "eval": vars(ec),
            "seed": self.cfg.seed,
            "reward": self.reward_id,
        }

        def base_fn(out: Path) -> dict:
            summary = self._evaluate(self.base, out, None)
            held = self._heldout_pairs(out / "samples.jsonl")
            return {**summary, **(self._agreement(self.base, held) if held else {})}

        self._stage("eval/base", base_inputs, base_fn)
        held = self._heldout_pairs(self.root / "eval" / "base" / "samples.jsonl")
        base_fp = self._fp("eval/base")
        base_rewards = json.loads((self.root / "eval" / "base" / "rewards.json").read_text())
        rows = [self._row("base", None, self._read("eval/base")["summary"], base_rewards, base_rewards)]
        for name, run, beta in runs:
            model_dir = self.root / "train" / name / "run" / "model"
            inputs = {**base_inputs, "train": self._fp(f"train/{name}"), "base_eval": base_fp}

            def fn(out: Path, model_dir=model_dir) -> dict:
                model = load_for_inference(str(model_dir), dtype=self.cfg.dtype).to(self.device).eval()
                return self._evaluate(model, out, held)

            self._stage(f"eval/{name}", inputs, fn)
            rewards = json.loads((self.root / "eval" / name / "rewards.json").read_text())
            rows.append(
                self._row(run.method, beta, self._read(f"eval/{name}")["summary"], rewards, base_rewards)
            )
        return rows

    def _agreement(self, model, held: list[dict]) -> dict:
        """SimPO's diagnostic on held-out pairs: does the average log-likelihood order agree with the reward?"""
        bs, pad = self.cfg.eval.logp_batch_size, self.tokenizer.pad_token_id
        p_ids = [p["prompt_ids"] for p in held]
        cw, nw = score_responses(
            model, p_ids, [p["chosen_ids"] for p in held], pad_token_id=pad, batch_size=bs
        )
        cl, nl = score_responses(
            model, p_ids, [p["rejected_ids"] for p in held], pad_token_id=pad, batch_size=bs
        )
        return {
            "logp_agreement": M.avg_logp_agreement(cw.tolist(), nw.tolist(), cl.tolist(), nl.tolist()),
            "heldout_pairs": len(held),
        }

    def _row(self, method: str, beta, summary: dict, rewards, base_rewards) -> dict:
        clusters = [
            i // self.cfg.eval.samples_per_prompt for i in range(len(rewards))
        ]  # prompt of each sample
        win, win_se = M.win_rate_and_se(rewards, base_rewards, clusters)
        return {
            "method": method,
            "beta": beta,
            "reward_mean": summary["reward_mean"],
            "reward_se": summary["reward_se"],
            "kl_mean": 0.0 if method == "base" else summary["kl_mean"],
            "kl_se": 0.0 if method == "base" else summary["kl_se"],
            "win_rate": win,
            "logp_agreement": summary.get("logp_agreement"),
            "n_samples": len(rewards),
            "win_rate_se": win_se,
        }

    def report(self, rows: list[dict], runs) -> None:
        write_results(self.root, rows)
        plot_frontier(rows, self.root / "frontier.png", title=f"{self.cfg.name}: reward vs KL")
        curves = {name: self.root / "train" / name / "run" / "metrics.jsonl" for name, _, _ in runs}
        images = ["frontier.png"]
        if curves:
            plot_training_curves(curves, self.root / "training_curves.png")
            images.append("training_curves.png")
        summary = {
            "model": self.model_path,
            "reward": self.cfg.reward,
            "pairs": self._read("pairs")["summary"],
            "sampling": self._read("samples")["summary"],
        }
        write_report_md(self.root, rows, summary, images)


def run_experiment(cfg: ExperimentConfig, log=print) -> list[dict]:
    """Run (or continue) the whole experiment; returns the result rows (also written to disk)."""
    from ..training.signals import stop_signals

    with stop_signals():  # SIGTERM stops like Ctrl-C; a training stage stops after its current step
        return _run(cfg, log)


def _run(cfg: ExperimentConfig, log) -> list[dict]:
    started = time.time()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "experiment_config.json", _jsonable(cfg))
    exp = Experiment(cfg, log)
    exp.prompts()
    exp.samples()
    exp.pairs()
    if any(uses_pair_reference(train_config(cfg, run, run.betas[0], output_dir="-")) for run in cfg.methods):
        exp.reference()
    runs = exp.train_runs()
    rows = exp.evaluate_all(runs)
    exp.report(rows, runs)
    log("\n" + format_table(rows))
    log(
        f"\nresults in {root} (results.csv, results.json, frontier.png, report.md) — {time.time() - started:.0f}s"
    )
    return rows


def _jsonable(cfg) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
