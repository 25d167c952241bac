"""DAPO's dynamic sampling (Yu et al. 2025, §3.2): a group whose rewards have no spread (all 0 or all 1 with
a verifier) has zero advantage, so it gives no gradient and only dilutes the step: with 0/1 rewards, a batch
where most groups are solved (or hopeless) trains at a fraction of its learning rate. With
``grpo.dynamic_sampling`` such groups are dropped and more groups are sampled until the batch is full again.

Where this departs from the paper's code (verl's ``filter_groups``, which keeps drawing whole batches from the
data loader): the extra prompts of round r of sampling batch b are a seeded draw ``randperm(seed, b, r)`` of
the training prompts, split over processes as the batch itself is, so the data order of later batches is
untouched and a resumed run draws the same. Every process samples the same number of extra prompts each round
(all processes take the same collectives), keeps the groups it needs, and stops when no process needs more.
After ``grpo.dynamic_sampling_max_rounds`` extra rounds a process still short fills its batch with the
zero-spread groups it dropped, in their order, so every process trains on the same number of groups (the
batch shape, and the number of micro-batches, stay those of the plan). Counts per batch are logged:
``dynamic/rounds``, ``dynamic/sampled_groups``, ``dynamic/kept_groups`` and ``dynamic/filled_groups``
(over all processes).
"""

from __future__ import annotations

import torch

from ..losses import zero_spread_groups
from ..sampling import derive_seed
from .engine import max_over_processes, sum_over_processes
from .rollout import Rollout, collect_rollout


def extra_prompts(n: int, per_batch: int, *, seed: int, batch: int, round_: int, world: int, rank: int):
    """This process's prompts for extra round ``round_`` (1, 2, ...) of sampling batch ``batch``: the first
    ``per_batch`` of a seeded permutation of the ``n`` training prompts, every ``world``-th from ``rank``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "dynamic-sampling", batch, round_))
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i % n] for i in range(per_batch)][rank::world]


def take_groups(rollout: Rollout, groups: list[int], group_size: int) -> Rollout:
    """The rollout of ``rollout``'s groups ``groups`` (in that order)."""
    rows = [g * group_size + j for g in groups for j in range(group_size)]
    index = torch.tensor(rows, dtype=torch.long)
    tensors = {
        name: (None if getattr(rollout, name) is None else getattr(rollout, name)[index])
        for name in Rollout.TENSORS
    }
    return Rollout(
        batch=rollout.batch,
        prompt_index=[rollout.prompt_index[g] for g in groups],
        prompt_ids=[rollout.prompt_ids[i] for i in rows],
        completion_ids=[rollout.completion_ids[i] for i in rows],
        completions=[rollout.completions[i] for i in rows],
        per_function={k: [v[i] for i in rows] for k, v in rollout.per_function.items()},
        stats=dict(rollout.stats),
        **tensors,
    )


def concat(parts: list[Rollout]) -> Rollout:
    """One rollout of ``parts`` in order (the first part's batch index and stats)."""
    first = parts[0]
    tensors = {}
    for name in Rollout.TENSORS:
        values = [getattr(p, name) for p in parts]
        tensors[name] = None if any(v is None for v in values) else torch.cat(values)
    return Rollout(
        batch=first.batch,
        prompt_index=[i for p in parts for i in p.prompt_index],
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        completion_ids=[x for p in parts for x in p.completion_ids],
        completions=[x for p in parts for x in p.completions],
        per_function={k: [x for p in parts for x in p.per_function[k]] for k in first.per_function},
        stats=dict(first.stats),
        **tensors,
    )


def collect_full_rollout(*, cfg, n_prompts: int, accelerator, **collect) -> tuple[Rollout, dict[str, float]]:
    """A batch of ``prompts_per_batch`` groups with reward spread, as far as ``dynamic_sampling_max_rounds``
    extra rounds allow (see the module docstring). ``collect`` are :func:`collect_rollout`'s keywords
    (``indices`` the planned prompts of this process, ``batch`` the sampling batch). ``reward`` and the
    completion statistics describe the planned prompts' samples (comparable with a run without dynamic
    sampling); ``reward_std``, which batch scaling divides by, is the kept batch's."""
    g = cfg.grpo
    G, acc = g.completions_per_prompt, accelerator
    first, timings = collect_rollout(cfg=cfg, accelerator=acc, **collect)
    need = len(first.prompt_index)
    valid = first.valid
    flat = torch.nan_to_num(first.rewards)
    zero = zero_spread_groups(flat, G, valid).tolist()
    kept = [take_groups(first, [i for i, z in enumerate(zero) if not z], G)]
    dropped = [take_groups(first, [i for i, z in enumerate(zero) if z], G)]
    have, sampled, rounds = need - sum(zero), need, 0
    while (
        rounds < g.dynamic_sampling_max_rounds
        and max_over_processes(acc, {"short": need - have})["short"] > 0
    ):
        rounds += 1
        indices = extra_prompts(
            n_prompts, g.prompts_per_batch, seed=cfg.training.seed, batch=first.batch, round_=rounds,
            world=acc.num_processes, rank=acc.process_index,
        )  # fmt: skip
        more, extra_time = collect_rollout(
            cfg=cfg, accelerator=acc, **{**collect, "indices": indices, "round_": rounds}
        )
        for key, value in extra_time.items():
            timings[key] += value
        sampled += len(indices)
        zero = zero_spread_groups(torch.nan_to_num(more.rewards), G, more.valid).tolist()
        spread = [i for i, z in enumerate(zero) if not z][: max(need - have, 0)]
        kept.append(take_groups(more, spread, G))
        dropped.append(take_groups(more, [i for i, z in enumerate(zero) if z], G))
        have += len(spread)
    filled = max(need - have, 0)
    parts = [p for p in kept if p.prompt_index]
    pool = concat([p for p in dropped if p.prompt_index]) if filled else None
    if filled:
        parts.append(take_groups(pool, list(range(filled)), G))
    rollout = concat(parts)
    rollout.batch = first.batch
    ok = rollout.rewards[rollout.valid]
    sums = sum_over_processes(
        acc,
        {
            "n": float(ok.numel()), "sum": float(ok.sum()), "sumsq": float((ok * ok).sum()),
            "sampled": float(sampled), "kept": float(need - filled), "filled": float(filled),
        },
    )  # fmt: skip
    n = max(sums["n"], 1.0)
    mean = sums["sum"] / n
    var = max(sums["sumsq"] / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
    rollout.stats.update(
        {
            "reward_std": var**0.5,
            "dynamic/rounds": float(rounds),
            "dynamic/sampled_groups": sums["sampled"],
            "dynamic/kept_groups": sums["kept"],
            "dynamic/filled_groups": sums["filled"],
        }
    )
    return rollout, timings
