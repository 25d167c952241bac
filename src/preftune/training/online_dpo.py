"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792)
on the online loop (``online.py``): DPO on pairs sampled from the current policy and ranked by a reward.

Each optimizer step samples two completions of each of ``online_dpo.prompts_per_batch`` prompts from the
current policy (at T = ``generation.temperature``), scores both with the reward functions (any that GRPO
takes, a preftune reward model among them: ``reward_model:PATH``) and makes the higher-reward one the chosen
response. A pair whose rewards are equal (a tie) or lack a value (a function gave None) says nothing about
which is better: it is skipped and counted (``pairs/ties``, ``pairs/missing_reward``), and enters no loss.
The loss is the offline one, :data:`preftune.losses.pairwise.ONLINE_DPO_LOSSES` (``sigmoid``:
:func:`~preftune.losses.dpo_loss`; ``ipo``: :func:`~preftune.losses.ipo_loss`), on summed completion
log-probs of π_θ and π_ref, both of softmax(z/T) (the distribution sampled), averaged over the step's
non-tie pairs of every process (one global count, so N processes train as one). One batch of samples serves
one optimizer step (on-policy, as the paper and TRL's ``OnlineDPOTrainer``).

At the first step π_θ = π_ref, so h = 0 and each pair's loss is ln 2 (DPO) or (1/(2β))² (IPO). Logged
besides what every online method logs (``reward``, ``completions/*``, ``sampling/*``, ``entropy``): DPO's
pair metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``: means over the non-tie pairs), ``pairs/used``, ``pairs/ties``,
``pairs/missing_reward`` (counts of the step, all processes), ``pairs/reward_margin`` (mean reward gap of the
used pairs) and ``kl``, the mean sequence log π_θ − log π_ref of the step's samples (an estimate of
KL(π_θ‖π_ref) before the step). In ``completions.jsonl`` a completion's ``advantage`` is +1 (chosen),
−1 (rejected) or 0 (skipped pair).
"""

from __future__ import annotations

from functools import partial

import torch

from ..losses import LossOutput, pair_metrics
from ..losses.pairwise import ONLINE_DPO_LOSSES
from .engine import sum_over_processes
from .online import NO_GRAD_BATCH, OnlineMethod, SamplingAgreement, all_finite, micro_batches, train_online
from .rollout import Rollout, completion_logps

PAIR_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected",
)  # fmt: skip


def rank_pairs(rewards: torch.Tensor) -> torch.Tensor:
    """Each prompt's two completions ranked by reward: ``rewards`` (N,) with N = 2 × prompts, a prompt's two
    completions consecutive, NaN where there is no reward; returns (N,) float: +1 for the chosen (strictly
    higher reward), −1 for the rejected, 0 for both completions of a tie or of a pair missing a reward."""
    r = rewards.double().view(-1, 2)
    keep = ~torch.isnan(r).any(dim=1) & (r[:, 0] != r[:, 1])
    first = torch.where(r[:, 0] > r[:, 1], 1.0, -1.0)
    ranked = torch.where(keep.unsqueeze(1), torch.stack([first, -first], dim=1), 0.0)  # 0, not −0
    return ranked.reshape(-1).float()


def orient(values: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (P, 2) of each prompt's two completions, ``side`` (P,) the first completion's ranking (+1
    chosen, −1 rejected, 0 skipped: :func:`rank_pairs`) -> (chosen (P,), rejected (P,)); a skipped pair
    comes out in its sampled order (it is masked out of the loss). Keeps the autograd graph."""
    first = (side > 0).unsqueeze(1)
    chosen = torch.where(first, values[:, :1], values[:, 1:]).squeeze(1)
    rejected = torch.where(first, values[:, 1:], values[:, :1]).squeeze(1)
    return chosen, rejected


class OnlineDPO(OnlineMethod):
    def prepare(self, model, rollout: Rollout) -> None:
        """π_ref's log-probs of every completion, and each pair's ranking (in ``rollout.advantages``)."""
        s, t = self.s, self.s.cfg.training
        pad, width = s.prep.tokenizer.pad_token_id, s.cfg.generation.max_new_tokens
        ref_fn = partial(
            self.reference.shared_prefix_logps, share=t.share_prefix, temperature=s.cfg.generation.temperature
        )
        rollout.ref_logps = completion_logps(ref_fn, rollout, pad, NO_GRAD_BATCH * t.batch_size, width, 2)
        rollout.advantages = rank_pairs(rollout.rewards)
        r, side = rollout.rewards.double().view(-1, 2), rollout.advantages.view(-1, 2)
        keep = side[:, 0] != 0
        missing = torch.isnan(r).any(dim=1)
        counts = sum_over_processes(
            s.accelerator,
            {
                "used": float(keep.sum()),
                "ties": float((~keep & ~missing).sum()),
                "missing": float(missing.sum()),
                "margin": float((r[:, 0] - r[:, 1]).abs()[keep].sum()),
            },
        )
        rollout.stats.update(
            {
                "pairs/used": counts["used"],
                "pairs/ties": counts["ties"],
                "pairs/missing_reward": counts["missing"],
                "pairs/reward_margin": counts["margin"] / max(counts["used"], 1.0),
            }
        )

    def train_step(self, model, rollout: Rollout, iteration: int) -> tuple[dict[str, float], bool]:
        """Backward over every pair of the batch: the pair loss, summed over the non-tie pairs and divided by
        their number over every process."""
        s, o = self.s, self.s.cfg.online_dpo
        acc, loss_fn = s.accelerator, ONLINE_DPO_LOSSES[o.loss]
        n = len(rollout.completion_ids)
        local = float((rollout.advantages.view(-1, 2)[:, 0] != 0).sum())
        n_pairs = max(sum_over_processes(acc, {"pairs": local})["pairs"], 1.0)
        sums = dict.fromkeys(
            ("loss", "kl", "entropy", "tokens", "all_tokens", "padded_tokens", *PAIR_KEYS), 0.0
        )
        sums.update(pairs=local, sequences=float(n))
        finite = True
        agreement = SamplingAgreement() if rollout.sample_logps is not None else None
        for mb in micro_batches(model, rollout, range(n), s, sums, agreement=agreement):
            idx, cols, logps, tokens = mb["idx"], mb["cols"], mb["logps"], mb["tokens"]
            device = logps.device
            policy = logps.sum(dim=1).view(-1, 2)  # (pairs, 2): 0 off each completion's tokens
            ref = rollout.ref_logps[idx, :cols].to(device).sum(dim=1).view(-1, 2)
            side = rollout.advantages[idx].to(device).view(-1, 2)[:, 0]
            keep = side != 0
            (pc, pr), (rc, rr) = orient(policy, side), orient(ref, side)
            out = loss_fn(pc, pr, rc, rr, beta=o.beta)
            loss = torch.where(keep, out.losses, torch.zeros_like(out.losses)).sum() / n_pairs
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss * acc.num_processes)  # DDP averages over processes
            sums["tokens"] += float(tokens.sum())
            sums["entropy"] += float((mb["entropy"] * tokens).sum())
            sums["kl"] += float((policy.detach() - ref).sum())
            k = int(keep.sum())
            if k:
                kept = LossOutput(out.losses[keep], out.chosen_rewards[keep], out.rejected_rewards[keep])
                means = pair_metrics(kept, pc[keep], pr[keep])
                for key in ("loss", *PAIR_KEYS):
                    sums[key] += means[key] * k
        if agreement is not None:
            self.sampling_metrics = agreement.metrics(acc)
        return sums, all_finite(acc, finite)

    def row(self, sums: dict[str, float], rollout: Rollout) -> dict:
        pairs = sums["pairs"]
        row = {
            "loss": sums["loss"] / max(pairs, 1.0),  # 0 when every pair was skipped (nothing trained on)
            "entropy": sums["entropy"] / max(sums["tokens"], 1.0),
            "kl": sums["kl"] / max(sums["sequences"], 1.0),
        }
        if pairs > 0:
            row.update({key: sums[key] / pairs for key in PAIR_KEYS})
        return row


def train_online_dpo(s) -> dict:
    """Online DPO on the prompts of ``s`` (a :class:`preftune.training.run.Session`); returns the last train
    row."""
    return train_online(s, OnlineDPO)
