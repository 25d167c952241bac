"""The pair methods' family (DPO family, ODPO, SimPO): batches of fixed pairs and their loss.

Reference log-probs are precomputed once before training by default (``training.precompute_ref``): the
reference is frozen and the pairs are fixed, so one no-grad pass replaces a reference forward per step,
and full fine-tuning needs no second model copy (the policy *is* the reference before its first step).
Otherwise π_ref runs on every batch (see :mod:`preftune.training.reference` for its forms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import TrainConfig
from ..data import PairExample, collate_pairs
from ..losses import PAIR_METHODS, pair_metrics
from .reference import Reference, pair_logps


def pair_lengths(examples: Sequence[PairExample]) -> list[int]:
    return [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples]


def pair_rows(pair: PairExample, share_prefix: bool) -> tuple[int, int]:
    """(rows, row length) a pair adds to a batch: one packed row of prompt + both responses with
    ``share_prefix``, else two rows (prompt + chosen, prompt + rejected) padded to the longer
    (:func:`preftune.data.collate_pairs`); what ``training.max_tokens_per_batch`` counts."""
    if share_prefix:
        return 1, len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return 2, len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


class PairFamily:
    """Batches and per-batch loss for the pair methods."""

    def __init__(self, cfg: TrainConfig, examples: dict[str, Sequence[PairExample]], pad_token_id: int):
        self.cfg = cfg
        self.method = PAIR_METHODS[cfg.method]
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.ref_logps: dict[str, torch.Tensor] = {}  # split -> (N, 2) precomputed [chosen, rejected]
        self.reference: Reference | None = None  # run on every batch when nothing is precomputed

    def lengths(self, split: str) -> list[int]:
        """Tokens of each pair (prompt, chosen, rejected): what ``training.group_by_length`` sorts by."""
        return pair_lengths(self.examples[split])

    def token_rows(self, split: str) -> Callable[[int], tuple[int, int]]:
        """Example i's (rows, row length) in a batch (:func:`pair_rows`), for ``training.max_tokens_per_batch``."""
        return lambda i: pair_rows(self.examples[split][i], self.cfg.training.share_prefix)

    def make_batch(self, split: str, indices: list[int]) -> dict:
        pairs = [self.examples[split][i] for i in indices]
        batch = collate_pairs(pairs, self.pad_token_id)
        batch["pairs"] = pairs  # the token ids, for the log-prob path
        if self.cfg.training.share_prefix:  # one packed row per pair
            rows = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        else:
            rows = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
        batch["padding_share"] = 1.0 - sum(rows) / (len(rows) * max(rows))
        if split in self.ref_logps:
            ref = self.ref_logps[split][torch.tensor(indices)]  # (B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch

    def compute(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        share = self.cfg.training.share_prefix
        logps = pair_logps(model, batch["pairs"], self.pad_token_id, share)  # (2B,) on the model's device
        b = batch["index"].shape[0]
        inputs = {
            k: v.to(logps.device) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 1
        }
        inputs["policy_chosen_logps"], inputs["policy_rejected_logps"] = logps[:b], logps[b:]
        if not self.method.reference_free and "ref_chosen_logps" not in inputs:
            if self.reference is None:
                raise RuntimeError(
                    "no reference: the reference log-probs were neither precomputed nor set up"
                )
            ref = self.reference.pair_logps(batch["pairs"], self.pad_token_id, share)  # (2B,)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:b], ref[b:]
        out = self.method(inputs, **vars(self.cfg.method_config))
        return out.losses, {
            **pair_metrics(out, logps[:b], logps[b:]),
            "padding_share": batch["padding_share"],
        }
