"""The reward-model family: Bradley–Terry training of a one-output sequence-classification model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from ..config import TrainConfig
from ..data import PairExample, collate_pairs
from ..losses import bradley_terry_loss, pair_metrics
from ..models import device_of, to_device
from .pairs import pair_lengths, pair_rows


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
    """Batches of pairs scored by a one-output classifier; loss −log σ(r_w − r_l − m)."""

    def __init__(
        self, cfg: TrainConfig, examples: dict[str, Sequence[PairExample]], pad_token_id: int, eos_id
    ):
        self.cfg = cfg
        strip = lambda e: strip_eos(e, eos_id)  # noqa: E731
        # a streamed split (data/stream.py) strips each example as it is read
        self.examples = {
            k: v.map(strip) if hasattr(v, "map") else [strip(e) for e in v] for k, v in examples.items()
        }
        self.pad_token_id = pad_token_id

    def lengths(self, split: str) -> list[int]:
        return pair_lengths(self.examples[split])

    def token_rows(self, split: str) -> Callable[[int], tuple[int, int]]:
        """Example i's (rows, row length): always two plain rows (collate_pairs)."""
        return lambda i: pair_rows(self.examples[split][i], share_prefix=False)

    def make_batch(self, split: str, indices: list[int]) -> dict:
        return collate_pairs([self.examples[split][i] for i in indices], self.pad_token_id)

    def compute(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch = to_device(batch, device_of(model))
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = scores.squeeze(-1).float()  # (2B,)
        b = batch["index"].shape[0]
        margin = batch.get("margin") if self.cfg.reward_model.use_margin else None
        out = bradley_terry_loss(scores[:b], scores[b:], margin)
        return out.losses, pair_metrics(out)
