"""The online loop, shared by GRPO and PPO, beside the offline one and run by the same step harness.

A method (:class:`OnlineMethod`: ``grpo.py``, ``ppo.py``) says what it adds to a batch of samples and how
it trains on it; the loop is the same for both. One batch of samples is ``prompts_per_batch`` prompts ×
``completions_per_prompt`` completions and serves ``updates_per_batch`` optimizer steps (GRPO: μ =
``grpo.updates_per_batch``; PPO: ``ppo.epochs`` × ``ppo.minibatches``)::

    for step in steps:
        if a new batch is due (every updates_per_batch steps):
            rollout = sample the completions of this process's prompts and score them (rollout.py)
            method.prepare(rollout): no-grad passes (π_old, π_ref, values) and advantages
        method.train_step(rollout, iteration): micro-batches of training.batch_size completions, backward
        one guarded optimizer step; after a batch's last one, method.end_batch(rollout) (PPO's adaptive KL
        coefficient); metrics; completions.jsonl; then, as in the offline loop (harness.py): log, eval,
        checkpoint, a stop requested by a signal, agreed by every process (signals.py)

Sampling draws on seeds derived from (seed, batch, process), so a resumed run samples what the uninterrupted
run would; a checkpoint between the updates of a batch keeps the rollout, and the method's own state (PPO's
value head and KL coefficient). With ``data.streaming`` the prompts are read as consumed: the plan is a
:class:`~preftune.data.stream.PromptStreamPlan`, and a checkpoint keeps its stream position. Evaluation samples ``eval_samples_per_prompt`` completions of each held-out
prompt with a fixed seed (the same draws at every evaluation, so steps compare paired) and reports the mean
reward and the sequence KL to π_ref, both with prompt-clustered standard errors; step 0 is the starting model.

The sampling temperature T is part of the policy: every log-prob the loop and the methods compute (π_θ, π_old,
π_ref, the entropy, the evaluation's KL) is log_softmax(z/T) at the sampled token, the distribution the
samples were drawn from (``generation.top_p`` < 1 is refused: nothing renormalises to the nucleus). At a batch's
first training pass the log-probs trained on are compared with the sampler's own (:class:`SamplingAgreement`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate.utils import gather_object

from .. import heldout
from ..logprobs import shared_prefix_logps
from ..models import unwrap_model
from ..rewards import score_all
from ..sampling import derive_seed
from .engine import max_over_processes, sum_over_processes, trim_jsonl
from .harness import StepHarness
from .reference import Reference, setup_reference, uses_reference
from .rollout import Rollout, collect_rollout

NO_GRAD_BATCH = 4  # no-grad passes (π_old, π_ref, values) take 4 × training.batch_size completions at a time


class OnlineMethod(abc.ABC):
    """What a method adds to the online loop. ``s`` is the run's :class:`preftune.training.run.Session`,
    ``reference`` π_ref (None when β = 0)."""

    def __init__(self, s, reference: Reference | None):
        self.s, self.reference = s, reference
        self.sampling_metrics: dict[str, float] = {}  # set at a batch's first pass; logged once, then cleared

    def param_groups(self, params: list[torch.nn.Parameter]) -> list:
        """The optimizer's parameter groups: the model's trainable ``params`` and the method's own."""
        return params

    def extra_params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters beside the model's (clipped and stepped with them)."""
        return []

    def collect(self, **kwargs) -> tuple[Rollout, dict[str, float]]:
        """Sample and score a batch (:func:`preftune.training.rollout.collect_rollout`'s keywords)."""
        return collect_rollout(**kwargs)

    @abc.abstractmethod
    def prepare(self, model, rollout: Rollout) -> None:
        """Fill in what training on ``rollout`` needs besides the samples (no grad, under autocast)."""

    @abc.abstractmethod
    def train_step(self, model, rollout: Rollout, iteration: int) -> tuple[dict[str, float], bool]:
        """Backward over the completions of update ``iteration`` of this batch; returns metric sums (with
        ``all_tokens`` and ``padded_tokens``) and whether every loss was finite on every process."""

    @abc.abstractmethod
    def row(self, sums: dict[str, float], rollout: Rollout) -> dict:
        """The step's method-specific metrics from the (process-summed) ``sums``."""

    def end_batch(self, rollout: Rollout) -> None:
        """After the last update of a batch of samples (before its checkpoint): what moves once per batch."""
        return None

    def state(self) -> dict:
        """JSON state a checkpoint keeps (restored by :meth:`load`)."""
        return {}

    def save(self, folder: Path) -> None:
        """Write the method's tensors into a checkpoint folder or the run directory (none by default)."""
        return None

    def load(self, folder: Path, state: dict) -> None:
        """Restore from a checkpoint folder and its trainer state (nothing by default)."""
        return None


def train_online(s, method_class: type[OnlineMethod]) -> dict:
    """An online method on the prompts of ``s`` (a :class:`preftune.training.run.Session`); returns the last
    train row."""
    cfg, m = s.cfg, s.cfg.method_config
    acc, prep = s.accelerator, s.prep
    tokenizer = prep.tokenizer
    examples = prep.examples["train"]
    plan = prep.plan(acc.num_processes, acc.process_index)
    n_steps = prep.total_steps(acc.num_processes)
    updates = m.updates_per_batch
    reference = (
        setup_reference(s.model, cfg, prep.model_path, policy_trained=s.resume_from is not None)
        if uses_reference(cfg)
        else None
    )
    method = method_class(s, reference)
    params = [p for p in s.model.parameters() if p.requires_grad]
    rollout: Rollout | None = None  # the current batch of samples

    def restore(state: dict) -> None:  # resuming: the method's state, and the rollout of an unfinished batch
        nonlocal rollout
        method.load(s.resume_from, state)
        plan.restore(state)  # data.streaming: the prompt stream's position (data/stream.py)
        rollout = Rollout.load(s.resume_from, acc.process_index) if state["step"] % updates else None

    def files(step: int):
        mid_batch = step % updates and rollout is not None and rollout.batch == step // updates
        # every process's rollout goes into the checkpoint (the main process writes it): collective
        rollouts = gather_object([rollout]) if mid_batch and acc.num_processes > 1 else [rollout]

        def extra(folder: Path) -> None:
            method.save(folder)
            if mid_batch:
                for rank, r in enumerate(rollouts):
                    r.save(folder, rank)

        return extra

    h = StepHarness(
        cfg, accelerator=acc, model=s.model, tokenizer=tokenizer, run_dir=s.run_dir, signals=s.signals,
        n_steps=n_steps, groups=method.param_groups(params), params=params + method.extra_params(),
        resume_from=s.resume_from, on_restore=restore, files=files, log=s.log,
        state=lambda: {**method.state(), **plan.state()},
    )  # fmt: skip
    model, start_step = h.model, h.start_step
    completions_log = _CompletionsLog(s.run_dir / "completions.jsonl", acc, keep_until_step=start_step)
    evaluator = _Evaluator(s, reference) if "eval" in prep.examples else None
    if evaluator is not None and start_step == 0:
        h.metrics_log.write({"step": 0, "split": "eval", **evaluator(model, base=True)})

    def describe(indices: list[int]) -> str:
        names = [examples[i].source for i in indices]
        return "prompts " + "; ".join(names[:5]) + (f"; ... ({len(names)} in all)" if len(names) > 5 else "")

    def body(step: int) -> dict:
        nonlocal rollout
        began = time.perf_counter()
        batch_index, iteration = divmod(step, updates)
        timings = {"time/generate": 0.0, "time/score": 0.0, "time/old_ref_logps": 0.0}
        # (every step: a streamed plan keeps this batch's prompts readable, also after a resume mid-batch)
        epoch, (indices,) = plan.step(batch_index)
        if rollout is None or iteration == 0:
            rollout, timings = method.collect(
                model=model, cfg=cfg, tokenizer=tokenizer, examples=examples, indices=indices,
                rewards=prep.rewards, accelerator=acc, batch=batch_index, describe=describe,
            )  # fmt: skip
            started_logps = time.perf_counter()
            with acc.autocast():
                method.prepare(model, rollout)
            timings["time/old_ref_logps"] = time.perf_counter() - started_logps
        trained = time.perf_counter()
        sums, finite = method.train_step(model, rollout, iteration)
        outcome = h.update(
            step, finite,
            lambda: f"{describe(rollout.prompt_index)}. Lower the learning rate, look at the rewards",
            then=(lambda: method.end_batch(rollout)) if iteration == updates - 1 else None,
        )  # fmt: skip
        now = time.perf_counter()
        sums = sum_over_processes(acc, sums)
        row = {"step": step + 1, "split": "train", "epoch": epoch}
        row.update(rollout.stats, **method.row(sums, rollout), **method.sampling_metrics)
        method.sampling_metrics = {}
        row.update(lr=outcome.lr, grad_norm=outcome.grad_norm, **h.stepper.metrics())
        row["padding_share"] = 1.0 - sums["all_tokens"] / max(sums["padded_tokens"], 1.0)
        row.update(
            timings, **{"time/train": now - trained, "tokens_per_s": sums["all_tokens"] / (now - began)}
        )
        every = m.log_completions_every  # a batch's samples, once, when one of its μ steps is a multiple
        if every and iteration == 0 and (step == 0 or (step + updates) // every > step // every):
            completions_log.write(step + 1, rollout, examples)
        return row

    return h.run(
        body,
        postfix=lambda r: {"reward": f"{r['reward']:.3f}", "len": f"{r['completions/mean_length']:.1f}"},
        evaluate=(lambda: evaluator(model)) if evaluator is not None else None,
        on_step_end=s.on_step_end,
        # beside model/ (PPO's value head); nothing for GRPO
        finish=lambda: method.save(s.run_dir) if acc.is_main_process else None,
    )


def no_grad_logps(model, share: bool, value_head=None, *, temperature: float = 1.0):
    """A no-grad (prompts, groups, pad) -> flat per-token tensors function of ``model`` (π_old's pass): its
    log-probs at ``temperature``, and with ``value_head`` the values it gives the same positions' hidden
    states (one pass)."""

    def logps(prompts, groups, pad):
        hidden: list | None = [] if value_head is not None else None
        with torch.no_grad():
            flat, _, _ = shared_prefix_logps(
                model, prompts, groups, pad, share=share, hidden_out=hidden, temperature=temperature
            )
            return (flat,) if value_head is None else (flat, value_head(hidden[0]))

    return logps


def micro_batches(
    model,
    rollout: Rollout,
    order: Sequence[int],
    s,
    sums: dict[str, float],
    *,
    entropy=True,
    value_head=None,
    agreement: SamplingAgreement | None = None,
) -> Iterator[dict]:
    """Forward passes over the completions ``order`` (whole groups, each group's completions consecutive), in
    micro-batches of about ``training.batch_size`` completions (whole groups: each prompt is encoded once for
    its completions). Each yields, on the model's device, ``idx`` (completion indices), ``cols`` (the longest
    completion), ``tokens`` (n, cols) bool, ``logps`` (n, cols) and ``entropy`` (n, cols) (0 off ``tokens``),
    all of softmax(z/T) at T = ``generation.temperature``, and with ``value_head`` its ``values`` (n, cols).
    The caller's loss and backward run inside the micro-batch's contexts (autocast; DDP's no_sync but for the
    last); the padding counts go into ``sums``; with ``agreement`` the log-probs are compared with the
    sampler's."""
    cfg, acc = s.cfg, s.accelerator
    t, G, pad = cfg.training, cfg.method_config.completions_per_prompt, s.prep.tokenizer.pad_token_id
    order = list(order)
    per_micro = max(1, t.batch_size // G) * G
    starts = list(range(0, len(order), per_micro))
    for k, start in enumerate(starts):
        idx = order[start : start + per_micro]
        prompts, groups = rollout.groups(idx, G)
        if t.share_prefix:  # one packed row per group
            rows = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, groups)]
        else:
            rows = [len(p) + len(c) for p, group in zip(prompts, groups) for c in group]
        sums["all_tokens"] += float(sum(rows))
        sums["padded_tokens"] += float(len(rows) * max(rows))
        lengths = rollout.lengths(idx)
        cols = int(lengths.max())
        sync = acc.no_sync(model) if k < len(starts) - 1 else contextlib.nullcontext()
        with sync, acc.autocast():
            hidden: list | None = [] if value_head is not None else None
            flat, _, ent = shared_prefix_logps(
                model, prompts, groups, pad, entropy=entropy, share=t.share_prefix, hidden_out=hidden,
                temperature=cfg.generation.temperature,
            )  # fmt: skip
            device = flat.device
            tokens = (torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
            out = {"idx": idx, "cols": cols, "tokens": tokens, "logps": _spread(flat, tokens)}
            if agreement is not None:
                agreement.add(out["logps"], rollout.sample_logps[idx, :cols], tokens)
            out["entropy"] = _spread(ent, tokens) if ent is not None else None
            if value_head is not None:
                out["values"] = _spread(value_head(hidden[0]), tokens)
            yield out


class SamplingAgreement:
    """The log-probs trained on against the sampler's own, at a batch's first training pass, over every sampled
    completion token t of the pass (x_t = log π_train(y_t) − log π_sample(y_t), both at the sampling
    temperature; fp32 agree to ~1e-6, bf16 autocast to ~2e-2): ``sampling/logp_diff_mean`` and
    ``sampling/logp_diff_max`` (mean and max of |x_t|), and the importance ratio π_train/π_sample = exp(x_t)
    the first update would need to correct the mismatch: ``sampling/ratio_mean``, ``sampling/ratio_min``,
    ``sampling/ratio_max``. Sums and counts are summed over processes, maxima max-reduced."""

    def __init__(self):
        self.sums = {"tokens": 0.0, "abs": 0.0, "ratio": 0.0}
        self.max = {"abs": 0.0, "ratio": -math.inf, "inverse": -math.inf}  # "inverse": −min ratio

    def add(self, train_logps: torch.Tensor, sample_logps: torch.Tensor, tokens: torch.Tensor) -> None:
        """``train_logps`` (n, cols) as trained on, ``sample_logps`` (n, cols) the sampler's, ``tokens`` (n, cols)
        bool: the completion tokens to compare."""
        if not bool(tokens.any()):
            return
        x = (train_logps.detach().float() - sample_logps.to(train_logps.device).float())[tokens].double()
        ratio = x.exp()
        self.sums["tokens"] += float(x.numel())
        self.sums["abs"] += float(x.abs().sum())
        self.sums["ratio"] += float(ratio.sum())
        self.max["abs"] = max(self.max["abs"], float(x.abs().max()))
        self.max["ratio"] = max(self.max["ratio"], float(ratio.max()))
        self.max["inverse"] = max(self.max["inverse"], -float(ratio.min()))

    def metrics(self, acc) -> dict[str, float]:
        """The ``sampling/*`` metrics over every process (collective: every process calls it); {} when no
        process compared a token."""
        sums, maxima = sum_over_processes(acc, self.sums), max_over_processes(acc, self.max)
        if sums["tokens"] == 0:
            return {}
        n = sums["tokens"]
        return {
            "sampling/logp_diff_mean": sums["abs"] / n,
            "sampling/logp_diff_max": maxima["abs"],
            "sampling/ratio_mean": sums["ratio"] / n,
            "sampling/ratio_min": -maxima["inverse"],
            "sampling/ratio_max": maxima["ratio"],
        }


def _spread(flat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Flat per-token values (M,) into their (n, cols) places; 0 elsewhere (keeps the autograd graph)."""
    return torch.zeros(tokens.shape, dtype=flat.dtype, device=flat.device).masked_scatter(tokens, flat)


def all_finite(acc, finite: bool) -> bool:
    """Whether ``finite`` holds on every process."""
    return sum_over_processes(acc, {"bad": float(not finite)})["bad"] == 0


class _CompletionsLog:
    """``completions.jsonl``: every N steps, each completion of the main process's batch with its prompt,
    rewards (total and per function) and advantage (PPO: of the completion's first token)."""

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
                    "advantage": _first(rollout.advantages[i]),
                    "tokens": len(rollout.completion_ids[i]),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _first(advantage: torch.Tensor) -> float:
    return float(advantage.reshape(-1)[0]) if advantage.numel() else 0.0


class _Evaluator:
    """Held-out reward and sequence KL(π_θ‖π_ref), from the same fixed-seed samples at every evaluation; both
    π's at the sampling temperature T (softmax(z/T)), the distribution the samples come from."""

    def __init__(self, s, reference: Reference | None):
        self.s = s
        self.reference = (
            reference  # the training reference, or one made at the first evaluation that needs it
        )
        self.examples = s.prep.examples["eval"]

    def _ref(self) -> Reference:
        if self.reference is None:
            # no reference in training (β = 0): made now, of the starting weights (read again from disk)
            s = self.s
            self.reference = setup_reference(s.model, s.cfg, s.prep.model_path, policy_trained=True)
        return self.reference

    @torch.no_grad()
    def __call__(self, model, base: bool = False) -> dict[str, float]:
        s = self.s
        tok, acc, gen = s.prep.tokenizer, s.accelerator, s.cfg.generation
        k = s.cfg.method_config.eval_samples_per_prompt
        net = unwrap_model(model)
        prompt_ids = [e.prompt_ids for e in self.examples]
        with acc.autocast():
            groups, sampled_logps = heldout.sample_groups(
                net, prompt_ids, k, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                seed=derive_seed(s.cfg.training.seed, f"{s.cfg.method}-eval"),
                progress=s.cfg.training.progress and acc.is_main_process,  # minutes on a CPU: say so
            )  # fmt: skip
        ids = [c for group in groups for c in group]
        texts = [tok.decode(c, skip_special_tokens=True) for c in ids]
        per = [e for e in self.examples for _ in range(k)]
        columns = {
            name: [e.columns.get(name) for e in per]
            for name in sorted({c for e in self.examples for c in e.columns})
        }
        totals, per_function = score_all(s.prep.rewards, [e.prompt for e in per], texts, ids, columns)
        ratios = None  # π_θ = π_ref before the first step
        if not base:
            with acc.autocast():
                ratios = heldout.log_ratios(
                    net, self._ref(), prompt_ids, groups, pad_token_id=tok.pad_token_id,
                    batch_size=s.cfg.training.eval_batch_size, temperature=gen.temperature,
                    sampled_logps=sampled_logps, mixed_precision=s.cfg.training.mixed_precision,
                )  # fmt: skip
        row = heldout.summary(totals, heldout.clusters_of(groups), ratios)
        for name, values in per_function.items():
            given = [v for v in values if v is not None]
            if given:
                row[f"reward/{name}"] = sum(given) / len(given)
        row["completions/mean_length"] = sum(len(c) for c in ids) / len(ids)
        return row
