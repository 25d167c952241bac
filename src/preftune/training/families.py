"""What each offline family computes per batch: pair methods (DPO family, ODPO, SimPO) and the
Bradley–Terry reward model. The loop in ``loop.py`` is shared; only ``compute`` differs.

Reference log-probs are precomputed once before training by default (``training.precompute_ref``): the
reference is frozen and the pairs are fixed, so one no-grad pass replaces a reference forward per step,
and full fine-tuning needs no second model copy (the policy *is* the reference before its first step).
With LoRA the reference is the same model with adapters disabled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..config import TrainConfig
from ..data import PairExample, collate_pairs
from ..logprobs import sequence_logps
from ..losses import PAIR_LOSSES, LossOutput, bradley_terry_loss, pair_metrics
from ..models import is_peft

_SEQ_KEYS = ("input_ids", "attention_mask", "response_mask")


def pair_loss(method: str, method_cfg, pc, pr, batch: dict) -> LossOutput:
    """Dispatch to the method's pure loss with its config section as keyword arguments."""
    kw = dataclasses.asdict(method_cfg)
    if method == "simpo":
        return PAIR_LOSSES["simpo"](pc, pr, batch["chosen_lengths"], batch["rejected_lengths"], **kw)
    rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if method == "rpo":
        return PAIR_LOSSES["rpo"](pc, pr, rc, rr, batch["chosen_lengths"], **kw)
    if method == "odpo":
        return PAIR_LOSSES["odpo"](pc, pr, rc, rr, batch["score_chosen"], batch["score_rejected"], **kw)
    return PAIR_LOSSES[method](pc, pr, rc, rr, **kw)


def _reference_logps(model, ref_model, batch: dict) -> torch.Tensor:
    """(2B,) reference log-probs: a frozen copy, the policy with LoRA adapters off, or — for full
    fine-tuning before the first step, when nothing else is set — the policy itself."""
    seq = (batch[k] for k in _SEQ_KEYS)
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, *seq)[0]
        if is_peft(model):
            with model.disable_adapter():
                return sequence_logps(model, *seq)[0]
        return sequence_logps(model, *seq)[0]


class PairFamily:
    """Batches and per-batch loss for the pair methods."""

    def __init__(
        self, cfg: TrainConfig, examples: dict[str, Sequence[PairExample]], pad_token_id: int, device
    ):
        self.cfg = cfg
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.device = device
        self.needs_ref = cfg.method != "simpo"
        self.ref: dict[str, torch.Tensor] = {}  # split -> (N, 2) precomputed reference log-probs
        self.ref_model = None  # frozen copy, when not precomputing under full fine-tuning

    def make_batch(self, split: str, indices: list[int]) -> dict:
        batch = collate_pairs([self.examples[split][i] for i in indices], self.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.needs_ref and split in self.ref:
            ref = self.ref[split][torch.tensor(indices)].to(self.device)  # (B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch

    def precompute_reference(self, model, batch_size: int) -> dict[str, torch.Tensor]:
        """One no-grad pass over every split: (N, 2) [chosen, rejected] reference log-probs, on CPU."""
        was_training = model.training
        model.eval()
        for split, examples in self.examples.items():
            out = torch.empty(len(examples), 2)
            for start in range(0, len(examples), batch_size):
                idx = list(range(start, min(start + batch_size, len(examples))))
                batch = self.make_batch(split, idx)
                logps = _reference_logps(model, self.ref_model, batch)
                out[idx] = logps.view(2, -1).T.float().cpu()
            self.ref[split] = out
        model.train(was_training)
        return self.ref

    def compute(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.needs_ref and "ref_chosen_logps" not in batch:
            if self.ref_model is None and not is_peft(model):
                raise RuntimeError(
                    "no reference: full fine-tuning without precompute_ref needs a reference copy"
                )
            ref = _reference_logps(model, self.ref_model, batch)
            b = batch["index"].shape[0]
            batch = {**batch, "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
        logps, _ = sequence_logps(model, *(batch[k] for k in _SEQ_KEYS))  # (2B,)
        b = batch["index"].shape[0]
        pc, pr = logps[:b], logps[b:]
        out = pair_loss(self.cfg.method, self.cfg.method_config, pc, pr, batch)
        return out.losses, pair_metrics(out, pc, pr)


def strip_eos(example: PairExample, eos_id: int) -> PairExample:
    """Reward models score the last content token: the EOS the pair tokenizer appends is removed, so the
    position transformers' sequence-classification pooling picks (last non-pad token) is the same in
    training and in any later use, also for tokenizers whose pad token is the EOS token."""

    def cut(ids: tuple[int, ...]) -> tuple[int, ...]:
        return ids[:-1] if len(ids) > 1 and ids[-1] == eos_id else ids

    return dataclasses.replace(
        example, chosen_ids=cut(example.chosen_ids), rejected_ids=cut(example.rejected_ids)
    )


class RewardModelFamily:
    """Bradley–Terry training of a one-output sequence-classification model."""

    def __init__(
        self, cfg: TrainConfig, examples: dict[str, Sequence[PairExample]], pad_token_id: int, eos_id, device
    ):
        self.cfg = cfg
        self.examples = {k: [strip_eos(e, eos_id) for e in v] for k, v in examples.items()}
        self.pad_token_id = pad_token_id
        self.device = device

    def make_batch(self, split: str, indices: list[int]) -> dict:
        batch = collate_pairs([self.examples[split][i] for i in indices], self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def compute(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = scores.squeeze(-1).float()  # (2B,)
        b = batch["index"].shape[0]
        margin = batch.get("margin") if self.cfg.reward_model.use_margin else None
        out = bradley_terry_loss(scores[:b], scores[b:], margin)
        return out.losses, pair_metrics(out)
