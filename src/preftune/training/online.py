"""The online loop (GRPO and its variants), beside the offline one and built from the same engine.

One optimizer step takes ``grpo.prompts_per_step`` (P) prompts × ``grpo.group_size`` (G) completions; a batch
of samples serves ``grpo.iterations`` (μ) optimizer steps::

    for step in steps:
        if a new batch is due (every μ steps):
            rollout = sample G completions of each of this process's P/W prompts, score them, advantages;
                      π_old log-probs (μ > 1) and π_ref log-probs (β > 0), no grad
        for micro-batches of training.batch_size completions:
            per-token GRPO loss (losses.grpo_token_loss), aggregated over the whole step (losses.aggregate)
            backward
        one guarded optimizer step (engine.Stepper); metrics; completions.jsonl; eval; checkpoint;
        a stop requested by a signal, agreed by every process (signals.py)

At μ = 1 π_old is the detached current policy, so ρ = 1 exactly and no extra forward pass is made; the
logged loss then sits near 0 (it is −mean Â, and advantages are centred) while its gradient is the
advantage-weighted log-prob gradient. Sampling draws on seeds derived from (seed, batch, process), so a
resumed run samples what the uninterrupted run would; a checkpoint between the μ steps of a batch keeps the
rollout. Evaluation samples ``grpo.eval_samples_per_prompt`` completions of each held-out prompt with a fixed
seed (the same draws at every evaluation, so steps compare paired) and reports the mean reward and the
sequence KL to π_ref, both with prompt-clustered standard errors; step 0 is the starting model.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import metrics as M
from ..data import pack_sequences
from ..logprobs import sequence_logps, shared_prefix_logps
from ..losses import aggregate, clip_fractions, grpo_token_loss
from ..models import load_model, unwrap_model
from ..rewards import RewardError, score_all
from ..sampling import derive_seed, sample_ids
from .engine import (
    MetricsLog,
    NonFiniteError,
    Stepper,
    build_optimizer,
    end_of_step,
    save_state,
    stop_checkpoint,
    sum_over_processes,
    trim_jsonl,
)
from .reference import Reference, build_reference
from .rollout import Rollout, collect_rollout, completion_logps

NO_GRAD_BATCH = 4  # no-grad passes (π_old, π_ref) take 4 × training.batch_size completions at a time


def train_grpo(s) -> dict:
    """GRPO on the prompts of ``s`` (a :class:`preftune.training.run.Session`); returns the last train row."""
    cfg, g, t = s.cfg, s.cfg.grpo, s.cfg.training
    acc, prep = s.accelerator, s.prep
    tokenizer = prep.tokenizer
    pad, width = tokenizer.pad_token_id, cfg.generation.max_new_tokens
    examples = prep.examples["train"]
    plan = prep.plan(acc.num_processes, acc.process_index)
    n_steps = prep.total_steps(acc.num_processes)
    reference = _reference(s) if g.beta > 0 else None
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(t, params, n_steps)
    model, optimizer = acc.prepare(s.model, optimizer)
    stepper = Stepper(acc, optimizer, scheduler, params, t)
    start_step, rollout = 0, None
    if s.resume_from is not None:
        start_step = stepper.restore(s.resume_from)
        rollout = Rollout.load(s.resume_from) if start_step % g.iterations else None
        s.log(f"resumed from {s.resume_from} at step {start_step}/{n_steps}")
    metrics_log = MetricsLog(s.run_dir / "metrics.jsonl", acc, keep_until_step=start_step)
    completions_log = _CompletionsLog(s.run_dir / "completions.jsonl", acc, keep_until_step=start_step)
    evaluator = _Evaluator(s, reference) if "eval" in prep.examples else None
    if evaluator is not None and start_step == 0:
        metrics_log.write({"step": 0, "split": "eval", **evaluator(model, base=True)})

    def describe(indices: list[int]) -> str:
        names = [examples[i].source for i in indices]
        return "prompts " + "; ".join(names[:5]) + (f"; ... ({len(names)} in all)" if len(names) > 5 else "")

    def save(step: int) -> Path | None:
        mid_batch = step % g.iterations and rollout is not None and rollout.batch == step // g.iterations
        return save_state(
            s.run_dir, step, acc, model, tokenizer, optimizer, scheduler, t.keep_checkpoints, stepper.state(),
            extra=rollout.save if mid_batch else None,
        )  # fmt: skip

    bar = tqdm(
        total=n_steps, initial=start_step, desc=cfg.method, disable=not (t.progress and acc.is_main_process)
    )
    model.train()
    last: dict = {}
    completed, consistent = start_step, True
    with s.signals.deferred():
        try:
            for step in range(start_step, n_steps):
                began = time.perf_counter()
                batch_index, iteration = divmod(step, g.iterations)
                timings = {"time/generate": 0.0, "time/score": 0.0, "time/old_ref_logps": 0.0}
                if rollout is None or iteration == 0:
                    _, (indices,) = plan.step(batch_index)
                    rollout, timings = collect_rollout(
                        model=model, cfg=cfg, tokenizer=tokenizer, examples=examples, indices=indices,
                        rewards=prep.rewards, accelerator=acc, batch=batch_index, describe=describe,
                    )  # fmt: skip
                    started_logps = time.perf_counter()
                    with acc.autocast():
                        G, nograd = g.group_size, NO_GRAD_BATCH * t.batch_size  # no activations kept
                        if g.iterations > 1:  # π_old: the policy before this batch's first update
                            rollout.old_logps = completion_logps(
                                _no_grad(model, t.share_prefix), rollout, pad, nograd, width, G
                            )
                        if reference is not None:
                            rollout.ref_logps = completion_logps(
                                partial(reference.shared_prefix_logps, share=t.share_prefix),
                                rollout,
                                pad,
                                nograd,
                                width,
                                G,
                            )
                    timings["time/old_ref_logps"] = time.perf_counter() - started_logps
                trained = time.perf_counter()
                sums, finite = _train_step(model, rollout, cfg, acc, pad, width)
                consistent = False
                try:
                    outcome = stepper.step(finite_loss=finite)
                except NonFiniteError as exc:
                    consistent = True  # nothing was applied
                    raise NonFiniteError(
                        f"step {step + 1}: {exc}; {describe(rollout.prompt_index)}. Lower the learning rate, look "
                        "at the rewards, or set training.skip_nonfinite: true to skip such steps"
                    ) from None
                completed, consistent = step + 1, True
                now = time.perf_counter()
                sums = sum_over_processes(acc, sums)
                tokens = max(sums["tokens"], 1.0)
                row = {"step": step + 1, "split": "train", "epoch": batch_index // plan.steps_per_epoch}
                row.update(loss=sums["loss"], **rollout.stats)
                row.update(
                    {
                        k: sums[k] / tokens
                        for k in ("entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region")
                    }
                )
                if g.beta > 0:
                    row["kl"] = sums["kl"] / tokens
                row.update(lr=outcome.lr, grad_norm=outcome.grad_norm, **stepper.metrics())
                row["padding_share"] = 1.0 - sums["all_tokens"] / max(sums["padded_tokens"], 1.0)
                row.update(
                    timings,
                    **{"time/train": now - trained, "tokens_per_s": sums["all_tokens"] / (now - began)},
                )
                last = row
                due = g.log_completions_every and ((step + 1) % g.log_completions_every == 0 or step == 0)
                if due and iteration == 0:
                    completions_log.write(step + 1, rollout, examples)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['completions/mean_length']:.1f}")
                end_of_step(
                    step + 1, n_steps, t, row, metrics_log=metrics_log, accelerator=acc, signals=s.signals,
                    evaluate=(lambda: evaluator(model)) if evaluator is not None else None, save=save,
                    on_step_end=s.on_step_end,
                )  # fmt: skip
        except (KeyboardInterrupt, NonFiniteError, RewardError) as exc:
            bar.close()
            if completed > start_step:
                stop_checkpoint(
                    exc, consistent=consistent, accelerator=acc, save=lambda: save(completed), log=s.log
                )
            raise
        bar.close()
        if evaluator is not None:  # held until the model is saved
            metrics_log.write({"step": n_steps, "split": "eval", **evaluator(model)})
    return last


def _no_grad(model, share: bool):
    def logps(prompts, groups, pad):
        with torch.no_grad():
            return shared_prefix_logps(model, prompts, groups, pad, share=share)

    return logps


def _reference(s) -> Reference:
    """π_ref for the KL term: adapters off under LoRA, else a frozen copy of the starting weights."""

    def load_copy():
        return load_model(s.prep.model_path, trust_remote_code=s.cfg.model.trust_remote_code)

    return build_reference(
        s.model, during_training=True, load_copy=load_copy if s.resume_from is not None else None
    )


def _train_step(model, rollout: Rollout, cfg, acc, pad: int, width: int) -> tuple[dict[str, float], bool]:
    """Backward over this process's completions, in micro-batches; returns token-weighted metric sums and
    whether every loss was finite on every process."""
    g, t = cfg.grpo, cfg.training
    n = len(rollout.completion_ids)
    full_mask = rollout.loss_mask(range(n), width, g.mask_truncated)
    counts = sum_over_processes(
        acc, {"tokens": float(full_mask.sum()), "sequences": float(full_mask.any(dim=1).sum())}
    )
    n_tokens, n_sequences = int(counts["tokens"]), max(int(counts["sequences"]), 1)
    sums = dict.fromkeys(
        ("loss", "kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region"), 0.0
    )
    sums.update(tokens=float(full_mask.sum()), all_tokens=0.0, padded_tokens=0.0)
    finite = True
    G = g.group_size
    per_micro = max(1, t.batch_size // G) * G  # whole groups: each prompt is encoded once for its completions
    starts = list(range(0, n, per_micro))
    for k, start in enumerate(starts):
        idx = list(range(start, min(start + per_micro, n)))
        prompts, groups = rollout.groups(idx, G)
        if t.share_prefix:  # one packed row per group
            rows = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, groups)]
        else:
            rows = [len(p) + len(c) for p, group in zip(prompts, groups) for c in group]
        sums["all_tokens"] += float(sum(rows))
        sums["padded_tokens"] += float(len(rows) * max(rows))
        lengths = rollout.lengths(idx)
        cols = int(lengths.max())
        tokens = torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)  # (n, cols) completion tokens
        with acc.no_sync(model) if k < len(starts) - 1 else _nullcontext(), acc.autocast():
            flat, _, entropy = shared_prefix_logps(
                model, prompts, groups, pad, entropy=True, share=t.share_prefix
            )
            device = flat.device
            tokens = tokens.to(device)
            logps = torch.zeros(len(idx), cols, device=device).masked_scatter(tokens, flat)  # (n, cols)
            old = logps.detach() if rollout.old_logps is None else rollout.old_logps[idx, :cols].to(device)
            ref = None if rollout.ref_logps is None else rollout.ref_logps[idx, :cols].to(device)
            adv = rollout.advantages[idx].to(device)
            mask = rollout.loss_mask(idx, cols, g.mask_truncated).to(device)
            per_token, ratio, kl_t = grpo_token_loss(
                logps,
                old,
                adv,
                eps_low=g.epsilon_low,
                eps_high=g.epsilon_high,
                beta=g.beta,
                ref_logps=ref,
                kl=g.kl,
            )
            loss = aggregate(
                per_token, mask, g.aggregation, n_sequences=n_sequences, n_tokens=n_tokens, max_length=width
            )
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss * acc.num_processes)  # DDP averages over processes
        m = mask.float()
        ent = torch.zeros(len(idx), cols, device=device).masked_scatter(tokens, entropy)
        sums["loss"] += float(loss.detach())
        sums["entropy"] += float((ent * m).sum())
        if kl_t is not None:
            sums["kl"] += float((kl_t.detach() * m).sum())
        tok = float(m.sum())
        for key, value in clip_fractions(
            ratio.detach(), adv, mask, eps_low=g.epsilon_low, eps_high=g.epsilon_high
        ).items():
            sums[key] += value * tok
    bad = sum_over_processes(acc, {"bad": float(not finite)})["bad"]
    return sums, bad == 0


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


class _CompletionsLog:
    """``completions.jsonl``: every N steps, each completion of the main process's batch with its prompt,
    rewards (total and per function) and advantage."""

    def __init__(self, path: Path, accelerator, *, keep_until_step: int):
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process:
            trim_jsonl(path, keep_until_step)

    def write(self, step: int, rollout: Rollout, examples) -> None:
        if not self.accelerator.is_main_process:
            return
        G = len(rollout.completion_ids) // max(len(rollout.prompt_index), 1)
        with self.path.open("a") as f:
            for i, text in enumerate(rollout.completions):
                example = examples[rollout.prompt_index[i // G]]
                reward = float(rollout.rewards[i])
                row = {
                    "step": step,
                    "prompt": example.prompt,
                    "completion": text,
                    "reward": None if reward != reward else reward,
                    "rewards": {name: values[i] for name, values in rollout.per_function.items()},
                    "advantage": float(rollout.advantages[i]),
                    "tokens": len(rollout.completion_ids[i]),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _Evaluator:
    """Held-out reward and sequence KL(π_θ‖π_ref), from the same fixed-seed samples at every evaluation."""

    def __init__(self, s, reference: Reference | None):
        self.s = s
        self.reference = (
            reference  # the training reference, or one made at the first evaluation that needs it
        )
        self.examples = s.prep.examples["eval"]

    def _ref(self) -> Reference:
        if self.reference is None:
            if self.s.cfg.model.lora.enabled:
                self.reference = Reference(self.s.model, "adapters_off")
            else:  # no reference in training (β = 0): the starting weights, from disk, in fp32
                cfg = self.s.cfg
                frozen = load_model(self.s.prep.model_path, trust_remote_code=cfg.model.trust_remote_code)
                frozen = frozen.to(self.s.accelerator.device).eval().requires_grad_(False)
                self.reference = Reference(self.s.model, "copy", frozen)
        return self.reference

    @torch.no_grad()
    def __call__(self, model, base: bool = False) -> dict[str, float]:
        s, g = self.s, self.s.cfg.grpo
        tok, acc = s.prep.tokenizer, s.accelerator
        k = g.eval_samples_per_prompt
        net = unwrap_model(model)
        with acc.autocast():
            groups = sample_ids(
                net, [e.prompt_ids for e in self.examples], k, s.cfg.generation, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, seed=derive_seed(s.cfg.training.seed, "grpo-eval"),
            )  # fmt: skip
        ids = [c for group in groups for c in group]
        texts = [tok.decode(c, skip_special_tokens=True) for c in ids]
        per = [e for e in self.examples for _ in range(k)]
        columns = {
            name: [e.columns.get(name) for e in per]
            for name in sorted({c for e in self.examples for c in e.columns})
        }
        totals, per_function = score_all(s.prep.rewards, [e.prompt for e in per], texts, ids, columns)
        clusters = [i // k for i in range(len(ids))]
        scored = [(r, c) for r, c in zip(totals, clusters) if r is not None]
        row: dict[str, float] = {}
        if scored:
            row["reward"], row["reward_se"] = M.mean_and_se([r for r, _ in scored], [c for _, c in scored])
        for name, values in per_function.items():
            given = [v for v in values if v is not None]
            if given:
                row[f"reward/{name}"] = sum(given) / len(given)
        row["completions/mean_length"] = sum(len(c) for c in ids) / len(ids)
        if base:
            row["kl"], row["kl_se"] = 0.0, 0.0  # π_θ = π_ref before the first step
        else:
            policy, ref = self._sequence_logps(net, ids, per)
            row["kl"], row["kl_se"] = M.sequence_kl(policy, ref, clusters)
        return row

    def _sequence_logps(self, net, ids, per) -> tuple[list[float], list[float]]:
        pad, size = self.s.prep.tokenizer.pad_token_id, self.s.cfg.training.eval_batch_size
        reference = self._ref()
        policy, ref = [], []
        was_training = net.training
        net.eval()
        with self.s.accelerator.autocast():
            for start in range(0, len(ids), size):
                batch = pack_sequences(
                    [per[i].prompt_ids for i in range(start, min(start + size, len(ids)))],
                    ids[start : start + size],
                    pad,
                )
                keys = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                policy += sequence_logps(net, *keys)[0].tolist()
                ref += reference.sequence_logps(*keys).tolist()
        net.train(was_training)
        return policy, ref
