"""One batch of online samples, a *rollout*: this process's prompts → G completions each → rewards, then what
the method adds before training on it (GRPO: group advantages; PPO: values, KL-shaped rewards, GAE): the
per-token log-probs the loss needs besides the policy's own (π_old's when one batch serves several optimizer
steps, π_ref's when β > 0), the advantages, and PPO's values and returns. The sampler's own log-prob of each
sampled token (log π_sample, at the sampling temperature) is kept beside them, for the methods to compare with
the log-probs they train on.

Rewards are computed before any training forward pass. Per-token quantities are stored completion-aligned,
(N, L_max) with L_max = generation.max_new_tokens: column t is the t-th completion token. A rollout is saved
into a checkpoint taken between the μ steps of its batch, so a resumed run continues on the same samples.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import PromptExample
from ..rewards import RewardError, RewardFunction, score_all
from ..sampling import derive_seed, sample_ids_and_logps
from .engine import sum_over_processes


@dataclass
class Rollout:
    batch: int  # sampling batch index
    prompt_index: list[int]  # the examples of this process's prompts (P_local)
    prompt_ids: list[list[int]]  # per completion (N = P_local · G), rows grouped by prompt
    completion_ids: list[list[int]]  # per completion: sampled tokens, with the EOS if one was generated
    completions: list[str]
    rewards: torch.Tensor  # (N,) float64, NaN where no function gave a reward
    per_function: dict[str, list]  # function name -> (N,) rewards (None where it gave none)
    truncated: torch.Tensor  # (N,) bool: cut at max_new_tokens (no EOS)
    advantages: torch.Tensor | None = None  # GRPO (N,); PPO (N, L_max)
    old_logps: torch.Tensor | None = None  # (N, L_max): several optimizer steps per batch
    ref_logps: torch.Tensor | None = None  # (N, L_max), β > 0
    values: torch.Tensor | None = None  # (N, L_max), PPO: V(s_t) of the rollout's policy
    returns: torch.Tensor | None = None  # (N, L_max), PPO: GAE returns
    sample_logps: torch.Tensor | None = None  # (N, L_max) fp32: log π_sample, the sampler's log_softmax(z/T)
    stats: dict = field(default_factory=dict)  # batch-level metrics (all processes)

    TENSORS = (
        "rewards", "truncated", "advantages", "old_logps", "ref_logps", "values", "returns", "sample_logps",
    )  # fmt: skip

    @property
    def valid(self) -> torch.Tensor:
        return ~torch.isnan(self.rewards)

    def lengths(self, idx: Sequence[int]) -> torch.Tensor:
        return torch.tensor([len(self.completion_ids[i]) for i in idx], dtype=torch.long)

    def loss_mask(self, idx: Sequence[int], width: int, mask_truncated: bool) -> torch.Tensor:
        """(n, width) bool: the completion tokens of ``idx`` that enter the loss (not those of a completion
        without reward, nor, with ``mask_truncated``, of one cut at max_new_tokens)."""
        tokens = torch.arange(width).unsqueeze(0) < self.lengths(idx).unsqueeze(1)
        keep = self.valid[list(idx)]
        if mask_truncated:
            keep = keep & ~self.truncated[list(idx)]
        return tokens & keep.unsqueeze(1)

    def groups(self, idx: Sequence[int], group_size: int) -> tuple[list[list[int]], list[list[list[int]]]]:
        """The prompts of the whole groups in ``idx`` (consecutive completions), and their completions."""
        idx = list(idx)
        if idx[0] % group_size or len(idx) % group_size:
            raise ValueError("a micro-batch must hold whole groups")
        firsts = idx[::group_size]
        return [self.prompt_ids[i] for i in firsts], [self.completion_ids[i : i + group_size] for i in firsts]

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, folder: Path, rank: int = 0) -> None:
        """Into a checkpoint folder, as process ``rank``'s rollout (each process has its own prompts)."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name) for name in self.TENSORS if getattr(self, name) is not None}
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / f"rollout-{rank}.safetensors")
        meta = {
            k: getattr(self, k)
            for k in ("batch", "prompt_index", "prompt_ids", "completion_ids", "completions")
        }
        (folder / f"rollout-{rank}.json").write_text(
            json.dumps({**meta, "per_function": self.per_function, "stats": self.stats})
        )

    @classmethod
    def load(cls, folder: Path, rank: int = 0) -> Rollout | None:
        """Process ``rank``'s rollout from a checkpoint folder, or None when it holds none."""
        if not (folder / f"rollout-{rank}.json").is_file():
            return None
        from safetensors.torch import load_file

        tensors = load_file(folder / f"rollout-{rank}.safetensors")
        meta = json.loads((folder / f"rollout-{rank}.json").read_text())
        return cls(**meta, **{name: tensors.get(name) for name in cls.TENSORS})


def completion_logps(
    logps_fn: Callable,
    rollout: Rollout,
    pad_id: int,
    batch_size: int,
    width: int,
    group_size: int,
    *,
    outputs: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(N, width) per-token values of every completion under ``logps_fn``, a no-grad function of (prompts,
    groups of completions, pad id) returning flat per-token tensors like ``logprobs.shared_prefix_logps``
    (log-probs first; with ``outputs`` > 1 the first ``outputs`` of its results, e.g. log-probs and values,
    each becomes an (N, width) tensor); whole groups of about ``batch_size`` completions at a time."""
    n = len(rollout.completion_ids)
    per_micro = max(1, batch_size // group_size) * group_size
    out = [torch.zeros(n, width) for _ in range(outputs)]
    for start in range(0, n, per_micro):
        idx = list(range(start, min(start + per_micro, n)))
        prompts, groups = rollout.groups(idx, group_size)
        flats = logps_fn(prompts, groups, pad_id)
        mask = torch.arange(width).unsqueeze(0) < rollout.lengths(idx).unsqueeze(1)
        for k in range(outputs):
            out[k][idx] = torch.zeros(len(idx), width).masked_scatter(mask, flats[k].detach().float().cpu())
    return out[0] if outputs == 1 else tuple(out)


def collect_rollout(
    *,
    model,
    cfg: TrainConfig,
    tokenizer,
    examples: Sequence[PromptExample],
    indices: list[int],
    rewards: Sequence[RewardFunction],
    accelerator,
    batch: int,
    describe: Callable[[list[int]], str],
    round_: int = 0,
) -> tuple[Rollout, dict[str, float]]:
    """Sample and score ``completions_per_prompt`` completions of each of this process's prompts ``indices``
    of sampling batch ``batch``; returns the rollout (no advantages yet) and its timings (``time/generate``,
    ``time/score``)."""
    gen = cfg.generation
    G = cfg.method_config.completions_per_prompt
    prompts = [examples[i] for i in indices]
    started = time.perf_counter()
    # draws keyed by prompt: process-independent
    # round > 0: dynamic sampling's extra draws for this batch (training/dynamic.py), a stream of their own
    seed = derive_seed(cfg.training.seed, f"{cfg.method}-train", batch, *([round_] if round_ else []))
    with accelerator.autocast():
        groups, group_logps = sample_ids_and_logps(
            model, [p.prompt_ids for p in prompts], G, gen, eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, seed=seed, keys=indices,
        )  # fmt: skip
    generated = time.perf_counter()
    completion_ids = [ids for group in groups for ids in group]
    sample_logps = torch.zeros(len(completion_ids), gen.max_new_tokens)  # (N, L_max), 0 after the end
    for i, logps in enumerate(lp for group in group_logps for lp in group):
        sample_logps[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    per_prompt = [p for p in prompts for _ in range(G)]
    columns: dict[str, list] = {}
    for name in sorted({k for p in prompts for k in p.columns}):
        columns[name] = [p.columns.get(name) for p in per_prompt]
    try:
        totals, per_function = score_all(
            rewards, [p.prompt for p in per_prompt], completions, completion_ids, columns
        )
    except RewardError as err:
        raise RewardError(f"sampling batch {batch} ({describe(indices)}): {err}") from err
    scored = time.perf_counter()
    reward = torch.tensor([math.nan if r is None else r for r in totals], dtype=torch.float64)
    valid = ~torch.isnan(reward)
    # batch-level statistics over every process (the groups themselves are whole on each process)
    ok = reward[valid]
    sums = sum_over_processes(
        accelerator,
        {
            "n": float(valid.sum()),
            "sum": float(ok.sum()),
            "sumsq": float((ok * ok).sum()),
            "length": float(sum(len(c) for c in completion_ids)),
            "completions": float(len(completion_ids)),
            "truncated": float(sum(not c or c[-1] != tokenizer.eos_token_id for c in completion_ids)),
            **{
                f"fn/{name}/sum": float(sum(v for v in vals if v is not None))
                for name, vals in per_function.items()
            },
            **{
                f"fn/{name}/n": float(sum(v is not None for v in vals)) for name, vals in per_function.items()
            },
        },
    )
    n = max(sums["n"], 1.0)
    mean = sums["sum"] / n
    var = max(sums["sumsq"] / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))  # unbiased
    stats = {
        "reward": mean,
        "reward_std": math.sqrt(var),
        "completions/mean_length": sums["length"] / sums["completions"],
        "completions/clipped_ratio": sums["truncated"] / sums["completions"],
        **{
            f"reward/{name}": sums[f"fn/{name}/sum"] / max(sums[f"fn/{name}/n"], 1.0) for name in per_function
        },
    }
    truncated = torch.tensor([not c or c[-1] != tokenizer.eos_token_id for c in completion_ids])
    rollout = Rollout(
        batch=batch,
        prompt_index=list(indices),
        prompt_ids=[list(p.prompt_ids) for p in per_prompt],
        completion_ids=completion_ids,
        completions=completions,
        rewards=reward,
        per_function=per_function,
        truncated=truncated,
        sample_logps=sample_logps,
        stats=stats,
    )
    return rollout, {"time/generate": generated - started, "time/score": scored - generated}
