"""One batch of online samples, a *rollout*: this process's prompts → G completions each → rewards →
group advantages, plus the per-token log-probs the loss needs besides the policy's own: π_old's when one
batch serves several optimizer steps (μ > 1) and π_ref's when β > 0.

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
from ..losses import group_advantages, zero_spread_fraction
from ..rewards import RewardError, RewardFunction, score_all
from ..sampling import derive_seed, sample_ids
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
    advantages: torch.Tensor  # (N,)
    truncated: torch.Tensor  # (N,) bool: cut at max_new_tokens (no EOS)
    old_logps: torch.Tensor | None = None  # (N, L_max), μ > 1
    ref_logps: torch.Tensor | None = None  # (N, L_max), β > 0
    stats: dict = field(default_factory=dict)  # batch-level metrics (all processes)

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
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"rewards": self.rewards, "advantages": self.advantages, "truncated": self.truncated}
        for name in ("old_logps", "ref_logps"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "rollout.safetensors")
        meta = {
            k: getattr(self, k)
            for k in ("batch", "prompt_index", "prompt_ids", "completion_ids", "completions")
        }
        (folder / "rollout.json").write_text(
            json.dumps({**meta, "per_function": self.per_function, "stats": self.stats})
        )

    @classmethod
    def load(cls, folder: Path) -> Rollout | None:
        if not (folder / "rollout.json").is_file():
            return None
        from safetensors.torch import load_file

        tensors = load_file(folder / "rollout.safetensors")
        meta = json.loads((folder / "rollout.json").read_text())
        return cls(
            **meta,
            rewards=tensors["rewards"],
            advantages=tensors["advantages"],
            truncated=tensors["truncated"],
            old_logps=tensors.get("old_logps"),
            ref_logps=tensors.get("ref_logps"),
        )


def completion_logps(
    logps_fn: Callable, rollout: Rollout, pad_id: int, batch_size: int, width: int, group_size: int
) -> torch.Tensor:
    """(N, width) per-token log-probs of every completion under ``logps_fn`` (a no-grad function of (prompts,
    groups of completions, pad id) returning flat log-probs like ``logprobs.shared_prefix_logps``), whole
    groups of about ``batch_size`` completions at a time."""
    n = len(rollout.completion_ids)
    per_micro = max(1, batch_size // group_size) * group_size
    out = torch.zeros(n, width)
    for start in range(0, n, per_micro):
        idx = list(range(start, min(start + per_micro, n)))
        prompts, groups = rollout.groups(idx, group_size)
        flat = logps_fn(prompts, groups, pad_id)[0]
        mask = torch.arange(width).unsqueeze(0) < rollout.lengths(idx).unsqueeze(1)
        out[idx] = torch.zeros(len(idx), width).masked_scatter(mask, flat.detach().float().cpu())
    return out


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
) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and compute advantages for this process's prompts ``indices`` of sampling batch
    ``batch``; returns the rollout and its timings (``time/generate``, ``time/score``)."""
    g, gen = cfg.grpo, cfg.generation
    G = g.group_size
    prompts = [examples[i] for i in indices]
    started = time.perf_counter()
    seed = derive_seed(cfg.training.seed, "grpo-train", batch)  # draws keyed by prompt: process-independent
    with accelerator.autocast():
        groups = sample_ids(
            model, [p.prompt_ids for p in prompts], G, gen, eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, seed=seed, keys=indices,
        )  # fmt: skip
    generated = time.perf_counter()
    completion_ids = [ids for group in groups for ids in group]
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
            "zero_std": zero_spread_fraction(torch.nan_to_num(reward), G, valid) * len(prompts),
            "groups": float(len(prompts)),
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
    advantages = group_advantages(
        torch.nan_to_num(reward), G, scale=g.scale, baseline=g.baseline, valid=valid, batch_std=math.sqrt(var)
    )
    stats = {
        "reward": mean,
        "reward_std": math.sqrt(var),
        "frac_reward_zero_std": sums["zero_std"] / sums["groups"],
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
        advantages=advantages.float(),
        truncated=truncated,
        stats=stats,
    )
    return rollout, {"time/generate": generated - started, "time/score": scored - generated}
