"""GRPO on the online loop (``online.py``): group advantages from each prompt's G completions, the policy
loss (``grpo.policy_loss``: the clipped ratio, GSPO's sequence ratio or CISPO's clipped weight) and the
per-token KL to π_ref (:mod:`preftune.losses.policy_gradient`).

One optimizer step takes ``grpo.prompts_per_batch`` (P) prompts × ``grpo.completions_per_prompt`` (G) completions; a batch
of samples serves ``grpo.updates_per_batch`` (μ) optimizer steps, each over all of its completions. At μ = 1 π_old is
the detached current policy, so ρ = 1 exactly and no extra forward pass is made; the logged loss then sits
near 0 (it is −mean Â, and advantages are centred) while its gradient is the advantage-weighted log-prob
gradient. Every log-prob (π_θ, π_old, π_ref, the entropy) is of softmax(z/T), T = ``generation.temperature``;
the batch's first pass logs how far the trained-on log-probs are from the sampler's (``sampling/*``).
"""

from __future__ import annotations

from functools import partial

import torch

from ..losses import POLICY_LOSSES, aggregate, group_advantages, grpo_token_loss, zero_spread_fraction
from .dynamic import collect_full_rollout
from .engine import sum_over_processes
from .online import (
    NO_GRAD_BATCH,
    OnlineMethod,
    SamplingAgreement,
    all_finite,
    micro_batches,
    no_grad_logps,
    train_online,
)
from .rollout import Rollout, completion_logps


class GRPO(OnlineMethod):
    def collect(self, **kwargs) -> tuple[Rollout, dict[str, float]]:
        """The planned batch, or with ``grpo.dynamic_sampling`` one refilled with groups that have reward
        spread (DAPO; :mod:`preftune.training.dynamic`)."""
        if not self.s.cfg.grpo.dynamic_sampling:
            return super().collect(**kwargs)
        return collect_full_rollout(n_prompts=len(kwargs["examples"]), **kwargs)

    def prepare(self, model, rollout: Rollout) -> None:
        """Group advantages (their batch std over every process), π_old (μ > 1) and π_ref (β > 0)."""
        s, g, t = self.s, self.s.cfg.grpo, self.s.cfg.training
        acc, G = s.accelerator, g.completions_per_prompt
        reward, valid = torch.nan_to_num(rollout.rewards), rollout.valid
        n_groups = len(rollout.prompt_index)
        zero = sum_over_processes(
            acc, {"zero": zero_spread_fraction(reward, G, valid) * n_groups, "groups": float(n_groups)}
        )
        rollout.stats["frac_reward_zero_std"] = zero["zero"] / zero["groups"]
        rollout.advantages = group_advantages(
            reward, G, scale=g.scale, baseline=g.baseline, valid=valid, batch_std=rollout.stats["reward_std"]
        ).float()
        pad, width, nograd = (
            s.prep.tokenizer.pad_token_id,
            s.cfg.generation.max_new_tokens,
            NO_GRAD_BATCH * t.batch_size,
        )
        temperature = s.cfg.generation.temperature
        if g.updates_per_batch > 1:  # π_old: the policy before this batch's first update
            rollout.old_logps = completion_logps(
                no_grad_logps(model, t.share_prefix, temperature=temperature), rollout, pad, nograd, width, G
            )
        if self.reference is not None:
            ref_fn = partial(
                self.reference.shared_prefix_logps, share=t.share_prefix, temperature=temperature
            )
            rollout.ref_logps = completion_logps(ref_fn, rollout, pad, nograd, width, G)

    def train_step(self, model, rollout: Rollout, iteration: int) -> tuple[dict[str, float], bool]:
        """Backward over every completion of the batch: the per-token loss, aggregated over the whole step."""
        s, g = self.s, self.s.cfg.grpo
        acc, width = s.accelerator, s.cfg.generation.max_new_tokens
        n = len(rollout.completion_ids)
        full_mask = rollout.loss_mask(range(n), width, g.mask_truncated)
        counts = sum_over_processes(
            acc, {"tokens": float(full_mask.sum()), "sequences": float(full_mask.any(dim=1).sum())}
        )
        n_tokens, n_sequences = int(counts["tokens"]), max(int(counts["sequences"]), 1)
        policy = POLICY_LOSSES[g.policy_loss]
        sums = dict.fromkeys(("loss", "kl", "entropy", "all_tokens", "padded_tokens", *policy.shares), 0.0)
        sums.update(tokens=float(full_mask.sum()), sequences=float(full_mask.any(dim=1).sum()))
        finite = True
        agreement = SamplingAgreement() if iteration == 0 and rollout.sample_logps is not None else None
        for mb in micro_batches(model, rollout, range(n), s, sums, agreement=agreement):
            idx, cols, logps = mb["idx"], mb["cols"], mb["logps"]
            device = logps.device
            old = logps.detach() if rollout.old_logps is None else rollout.old_logps[idx, :cols].to(device)
            ref = None if rollout.ref_logps is None else rollout.ref_logps[idx, :cols].to(device)
            adv = rollout.advantages[idx].to(device)
            mask = rollout.loss_mask(idx, cols, g.mask_truncated).to(device)
            per_token, ratio, kl_t = grpo_token_loss(
                logps, old, adv, eps_low=g.epsilon_low, eps_high=g.epsilon_high, beta=g.beta, ref_logps=ref,
                kl=g.kl, policy_loss=g.policy_loss, mask=mask,
            )  # fmt: skip
            loss = aggregate(
                per_token, mask, g.aggregation, n_sequences=n_sequences, n_tokens=n_tokens, max_length=width
            )
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss * acc.num_processes)  # DDP averages over processes
            m = mask.float()
            sums["loss"] += float(loss.detach())
            sums["entropy"] += float((mb["entropy"] * m).sum())
            if kl_t is not None:
                sums["kl"] += float((kl_t.detach() * m).sum())
            # clip shares of this micro-batch's tokens (clip, cispo) or completions (gspo), summed as counts
            count = float(m.sum()) if policy.per == "tokens" else float(mask.any(dim=1).sum())
            fractions = policy.fractions(
                ratio.detach(), adv, mask, eps_low=g.epsilon_low, eps_high=g.epsilon_high
            )
            for key, value in fractions.items():
                sums[key] += value * count
        if agreement is not None:
            self.sampling_metrics = agreement.metrics(acc)
        return sums, all_finite(acc, finite)

    def row(self, sums: dict[str, float], rollout: Rollout) -> dict:
        tokens = max(sums["tokens"], 1.0)
        policy = POLICY_LOSSES[self.s.cfg.grpo.policy_loss]
        per = max(sums[policy.per], 1.0)  # the clip shares are of tokens or of completions
        row = {
            "loss": sums["loss"],
            "entropy": sums["entropy"] / tokens,
            **{k: sums[k] / per for k in policy.shares},
        }
        if self.s.cfg.grpo.beta > 0:
            row["kl"] = sums["kl"] / tokens
        return row


def train_grpo(s) -> dict:
    """GRPO on the prompts of ``s`` (a :class:`preftune.training.run.Session`); returns the last train row."""
    return train_online(s, GRPO)
