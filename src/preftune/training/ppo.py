"""PPO-based RLHF on the online loop (``online.py``): the baseline the DPO and ODPO papers compare against.

The four roles of RLHF: the **actor** (the policy being trained), the **critic** (a value head, below), the
**reward** (any reward functions GRPO accepts, a preftune-trained reward model among them) and the
**reference** π_ref (a frozen copy of the starting weights; adapters off under LoRA).

The critic is a linear value head V(s_t) = w·h_t + b on the actor's last hidden state h_t (the input of its
LM head, at the position that predicts token t), so one forward pass gives both the log-probs and the
values, and the critic adds H + 1 parameters (577 for SmolLM2-135M) instead of a second model; the price is
that the value loss also shapes the shared trunk (``ppo.vf_coef`` scales it). Under LoRA the head is trained
in full beside the adapters. A separate critic (a second model, e.g. initialised from the reward model, as
some RLHF setups do) would add its weights, gradients and AdamW moments (for a 135M model: 0.54 GB of fp32
weights + 0.54 GB of gradients + 1.08 GB of moments) and a second forward and backward per minibatch.

Per batch of rollouts (:meth:`PPO.prepare`, no grad): π_old's log-probs and values in one pass, π_ref's
log-probs (β > 0), the KL-shaped per-token rewards, GAE, whitened advantages. Then ``ppo.epochs`` passes over the rollouts, each in ``ppo.minibatches``
shuffled minibatches, one optimizer step each (:meth:`PPO.train_step`), minimising per token

    clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy

averaged over the minibatch's completion tokens. After the batch's last update the KL coefficient adapts
(``ppo.adaptive_kl``, :meth:`PPO.end_batch`), so a checkpoint at a batch boundary holds the coefficient the
next batch starts from. Each piece is a function of :mod:`preftune.losses.ppo`.

Every log-prob (π_θ, π_old, π_ref, the entropy) is of softmax(z/T), T = ``generation.temperature``; the value
head reads the hidden states, which T does not touch. A batch's first minibatch logs how far the trained-on
log-probs are from the sampler's (``sampling/*``, :class:`preftune.training.online.SamplingAgreement`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..files import save_safetensors_atomic
from ..losses import (
    adaptive_kl_coef,
    approx_kl,
    clip_fractions,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance_from_sums,
    gae,
    kl_shaped_rewards,
    mean_var_from_sums,
    whiten,
)
from ..models import device_of, unwrap_model
from ..sampling import derive_seed
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

VALUE_HEAD_FILE = "value_head.safetensors"
_SUMS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_ratio/policy", "clip_ratio/value")


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the hidden states the LM head reads, in fp32 (autocast off). Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.linear(hidden.float()).squeeze(-1)


class PPO(OnlineMethod):
    def __init__(self, s, reference):
        super().__init__(s, reference)
        p = s.cfg.ppo
        config = unwrap_model(s.model).config
        hidden = getattr(config, "hidden_size", None) or config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden).to(device_of(s.model))
        self.kl_coef = p.beta

    # -- the optimizer and checkpoints -------------------------------------------------------------------
    def param_groups(self, params):
        p, t = self.s.cfg.ppo, self.s.cfg.training
        lr = p.value_learning_rate or 10 * t.learning_rate
        return [{"params": params}, {"params": list(self.value_head.parameters()), "lr": lr}]

    def extra_params(self):
        return list(self.value_head.parameters())

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def save(self, folder: Path) -> None:
        tensors = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        save_safetensors_atomic(Path(folder) / VALUE_HEAD_FILE, tensors)

    def load(self, folder: Path, state: dict) -> None:
        from safetensors.torch import load_file

        self.value_head.load_state_dict(load_file(Path(folder) / VALUE_HEAD_FILE))
        self.kl_coef = state.get("kl_coef", self.kl_coef)

    # -- one batch of rollouts ---------------------------------------------------------------------------
    def prepare(self, model, rollout: Rollout) -> None:
        """π_old's log-probs and values, π_ref's log-probs, KL-shaped rewards, GAE, whitened advantages; the
        batch's statistics over every process."""
        s, p, t = self.s, self.s.cfg.ppo, self.s.cfg.training
        acc, G = s.accelerator, p.completions_per_prompt
        pad, width, nograd = (
            s.prep.tokenizer.pad_token_id,
            s.cfg.generation.max_new_tokens,
            NO_GRAD_BATCH * t.batch_size,
        )
        temperature = s.cfg.generation.temperature  # log-probs of softmax(z/T); the values read h, not z
        old_fn = no_grad_logps(model, t.share_prefix, value_head=self.value_head, temperature=temperature)
        old, values = completion_logps(old_fn, rollout, pad, nograd, width, G, outputs=2)
        n = len(rollout.completion_ids)
        mask = rollout.loss_mask(range(n), width, mask_truncated=False)  # completions with a reward
        scores = torch.nan_to_num(rollout.rewards).float()
        if self.reference is not None:
            ref_fn = partial(
                self.reference.shared_prefix_logps, share=t.share_prefix, temperature=temperature
            )
            rollout.ref_logps = completion_logps(ref_fn, rollout, pad, nograd, width, G)
            rewards, kl_t = kl_shaped_rewards(
                scores, old, rollout.ref_logps, mask, kl_coef=self.kl_coef, kl=p.kl
            )
        else:  # β = 0: the score alone, on the last token
            rewards, kl_t = kl_shaped_rewards(scores, old, old, mask, kl_coef=0.0, kl="k1")
        advantages, returns = gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        m = mask.double()
        sums = sum_over_processes(
            acc,
            {
                "tokens": float(m.sum()),
                "adv": float((advantages.double() * m).sum()),
                "adv2": float((advantages.double() ** 2 * m).sum()),
                "sequences": float(mask.any(dim=1).sum()),
                "kl": float(kl_t.double().sum()),
                "shaped": float((rewards.double() * m).sum()),
                "values": float((values.double() * m).sum()),
                "returns": float((returns.double() * m).sum()),
                "returns2": float((returns.double() ** 2 * m).sum()),
                "error2": float(((returns - values).double() ** 2 * m).sum()),
                "error": float(((returns - values).double() * m).sum()),
            },
        )
        tokens, sequences = max(sums["tokens"], 1.0), max(sums["sequences"], 1.0)
        if p.whiten_advantages:  # over every process's tokens
            mean, var = mean_var_from_sums(sums["tokens"], sums["adv"], sums["adv2"])
            advantages = whiten(advantages, mask, mean=mean, var=var)
        rollout.old_logps, rollout.values, rollout.advantages, rollout.returns = (
            old,
            values,
            advantages,
            returns,
        )
        kl = sums["kl"] / sequences  # mean sequence KL(π_old‖π_ref) of the batch, in nats
        rollout.stats.update(
            {
                "kl": kl,
                "kl_coef": self.kl_coef,
                "reward_shaped": sums["shaped"] / sequences,  # R − β·KL per completion
                "values/mean": sums["values"] / tokens,
                "returns/mean": sums["returns"] / tokens,
                "explained_variance": explained_variance_from_sums(
                    sums["tokens"], sums["returns"], sums["returns2"], sums["error"], sums["error2"]
                ),
            }
        )

    def end_batch(self, rollout: Rollout) -> None:
        """The adaptive KL coefficient moves once the batch's updates are done, from the batch's KL (one step
        of the controller per batch: the horizon is in batches)."""
        p = self.s.cfg.ppo
        if p.adaptive_kl:
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef, rollout.stats["kl"], target=p.target_kl, horizon=p.kl_horizon_batches, n=1
            )

    # -- one optimizer step: one minibatch of one epoch --------------------------------------------------
    def minibatch(self, rollout: Rollout, iteration: int) -> list[int]:
        """The completions of update ``iteration``: a seeded shuffle of this process's prompts per (batch,
        epoch), split into ``ppo.minibatches`` parts; each prompt's completions stay together."""
        s, p = self.s, self.s.cfg.ppo
        epoch, part = divmod(iteration, p.minibatches)
        n_groups, G = len(rollout.prompt_index), p.completions_per_prompt
        seed = derive_seed(
            s.cfg.training.seed, "ppo-minibatches", rollout.batch, epoch, s.accelerator.process_index
        )
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed)).tolist()
        size = n_groups // p.minibatches
        groups = order[part * size : (part + 1) * size]
        return [g * G + j for g in groups for j in range(G)]

    def train_step(self, model, rollout: Rollout, iteration: int) -> tuple[dict[str, float], bool]:
        s, p = self.s, self.s.cfg.ppo
        acc, width = s.accelerator, s.cfg.generation.max_new_tokens
        order = self.minibatch(rollout, iteration)
        mask_all = rollout.loss_mask(order, width, mask_truncated=False)
        n_tokens = max(sum_over_processes(acc, {"t": float(mask_all.sum())})["t"], 1.0)
        sums = dict.fromkeys(_SUMS, 0.0)
        sums.update(tokens=float(mask_all.sum()), all_tokens=0.0, padded_tokens=0.0)
        finite = True
        entropy = "grad" if p.entropy_coef > 0 else True
        agreement = SamplingAgreement() if iteration == 0 and rollout.sample_logps is not None else None
        batches = micro_batches(
            model, rollout, order, s, sums, entropy=entropy, value_head=self.value_head, agreement=agreement
        )
        for mb in batches:
            idx, cols, logps, values = mb["idx"], mb["cols"], mb["logps"], mb["values"]
            device = logps.device
            old = rollout.old_logps[idx, :cols].to(device)
            old_values = rollout.values[idx, :cols].to(device)
            adv = rollout.advantages[idx, :cols].to(device)
            returns = rollout.returns[idx, :cols].to(device)
            mask = rollout.loss_mask(idx, cols, mask_truncated=False).to(device)
            m = mask.float()
            pg, ratio = clipped_policy_loss(logps, old, adv, eps_low=p.epsilon, eps_high=p.epsilon)
            vf, v_clipped = clipped_value_loss(values, old_values, returns, clip=p.value_clip)
            per_token = pg + p.vf_coef * vf
            if p.entropy_coef > 0:
                per_token = per_token - p.entropy_coef * mb["entropy"]
            loss = (per_token * m).sum() / n_tokens  # token mean over the whole minibatch
            finite = finite and bool(torch.isfinite(loss))
            acc.backward(loss * acc.num_processes)  # DDP averages over processes
            sums["policy_loss"] += float((pg.detach() * m).sum())
            sums["value_loss"] += float((vf.detach() * m).sum())
            sums["entropy"] += float((mb["entropy"].detach() * m).sum())
            sums["approx_kl"] += float((approx_kl(logps.detach(), old) * m).sum())  # ½(log ρ)², as TRL
            clipped = clip_fractions(ratio.detach(), adv, mask, eps_low=p.epsilon, eps_high=p.epsilon)
            sums["clip_ratio/policy"] += clipped["clip_ratio/region"] * float(m.sum())
            sums["clip_ratio/value"] += float((v_clipped & mask).sum())
        if acc.num_processes > 1:  # the head is outside DDP: average its gradients as DDP does the model's
            for param in self.value_head.parameters():
                if param.grad is not None:
                    param.grad = acc.reduce(param.grad, reduction="mean")
        if agreement is not None:
            self.sampling_metrics = agreement.metrics(acc)
        return sums, all_finite(acc, finite)

    def row(self, sums: dict[str, float], rollout: Rollout) -> dict:
        tokens = max(sums["tokens"], 1.0)
        p = self.s.cfg.ppo
        row = {k: sums[k] / tokens for k in _SUMS}
        row["loss"] = row["policy_loss"] + p.vf_coef * row["value_loss"] - p.entropy_coef * row["entropy"]
        return row


def train_ppo(s) -> dict:
    """PPO on the prompts of ``s`` (a :class:`preftune.training.run.Session`); returns the last train row."""
    return train_online(s, PPO)
