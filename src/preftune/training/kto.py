"""The unpaired family (KTO): batches of (prompt, completion, label) records and their loss.

KTO's reference point z0 is estimated, as in the paper (Section 4.2) and TRL, from MISMATCHED
(prompt, completion) pairs of the same batch: record i's prompt with record i-1's completion (cyclically,
record 0 takes the last record's completion; TRL's ``[y_n] + [y_1 .. y_{n-1}]`` rotation), so the
mismatched completions are the batch's own completions under other prompts. Each record is scored as a
"pair" (its own completion, its mismatched one) through the one pair log-prob path, the prompt encoded once
for both. z0 = max(0, mean over the mismatched pairs of log pi_theta - log pi_ref), detached; in training the
sum and the count are summed over processes first, so every process uses the same z0 (an empty share at the
end of an epoch runs the loop's zero-weight stand-in, whose mismatched pair still counts in z0). A
micro-batch of one record pairs its completion with itself (as TRL's rotation does).

Where we depart from TRL: TRL fixes the mismatched completion per record when it prepares the data (the
rotation runs over dataset-order chunks of the batch size, before the sampler shuffles), so its "KL
completions" usually come from records outside the training batch; here they are the training micro-batch's
own, as the paper describes. The reference therefore runs on every batch (a frozen copy, or the adapters
switched off under LoRA): the mismatched pairs change with the shuffle, so their reference log-probs cannot be
precomputed once, and ``training.precompute_ref`` does not apply to KTO (the run says so in its log).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..config import TrainConfig
from ..data import PairExample, UnpairedExample, collate_unpaired
from ..losses import kto_loss, kto_reference_point
from .reference import Reference, completion_logps, pair_logps


def kl_pairs(records: Sequence[UnpairedExample]) -> list[PairExample]:
    """Each record as a pair (its own completion, record i-1's completion) for the pair log-prob path."""
    b = len(records)
    return [
        PairExample(i, r.prompt_ids, r.completion_ids, records[(i - 1) % b].completion_ids, source=r.source)
        for i, r in enumerate(records)
    ]


class KTOFamily:
    """Batches and per-batch loss for KTO. ``reduce`` sums a dict of floats over processes (training only).

    Metrics (TRL's names): ``loss`` (mean per record), ``rewards/chosen`` / ``rewards/rejected`` (mean beta * r
    of the desirable / undesirable records), ``rewards/margins`` (their difference), ``logps/chosen`` /
    ``logps/rejected`` (mean summed log pi_theta), ``kl`` (z0) and ``desirable_fraction``. The label means are
    over the micro-batch of all processes (their sums and counts travel with z0's), so with ``grad_accum: 1``
    they are exact per step; a label the micro-batch lacks gives NaN, logged as null (``metrics.jsonl`` has no
    NaN), and so does a step or eval pass with such a micro-batch: an undefined mean, never a made-up 0.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        examples: dict[str, Sequence[UnpairedExample]],
        pad_token_id: int,
        reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        self.cfg = cfg
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.reduce = reduce
        self.reference: Reference | None = None  # runs on every batch
        # training.max_tokens_per_batch: the micro-batch's z0 and each record's mismatched completion
        self._micro: dict | None = None

    def lengths(self, split: str) -> list[int]:
        return [len(e.prompt_ids) + len(e.completion_ids) for e in self.examples[split]]

    def token_rows(self, split: str) -> Callable[[int], tuple[int, int]]:
        """Record i's (rows, row length) in a pass: once :meth:`begin_micro` has fixed z0, one row of its prompt
        and completion (the mismatched half is not scored again); before, its pair with itself."""

        def rows(i: int) -> tuple[int, int]:
            r = self.examples[split][i]
            if self._micro is not None:  # z0 fixed by begin_micro: a pass scores the record's own completion
                return 1, len(r.prompt_ids) + len(r.completion_ids)
            if self.cfg.training.share_prefix:
                return 1, len(r.prompt_ids) + 2 * len(r.completion_ids)
            return 2, len(r.prompt_ids) + len(r.completion_ids)

        return rows

    def begin_micro(self, model, indices: list[int]) -> None:
        """Under ``training.max_tokens_per_batch`` a micro-batch runs in several passes, but z0 is the mean over
        the whole micro-batch's mismatched pairs (of all processes): one no-grad pass over the mismatched
        completions first fixes z0, and the passes then score only each record's own completion, so the step
        equals the undivided one at the same cost (each half is scored once by the policy and the reference).
        """
        records = [self.examples["train"][i] for i in indices]
        pairs, b = kl_pairs(records), len(records)
        share = self.cfg.training.share_prefix
        prompts, others = [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs]
        with torch.no_grad():
            logps = completion_logps(model, prompts, others, self.pad_token_id, share)  # (B,)
            ref = self.reference.completion_logps(prompts, others, self.pad_token_id, share).to(logps.device)
        sums = {"kl_sum": (logps - ref).double().sum().item(), "kl_count": float(b)}
        if self.reduce is not None:
            sums = self.reduce(sums)
        self._micro = {"z0": kto_reference_point(sums["kl_sum"], sums["kl_count"])}

    def make_batch(self, split: str, indices: list[int]) -> dict:
        records = [self.examples[split][i] for i in indices]
        batch = collate_unpaired(records, self.pad_token_id)
        batch["records"] = records
        if split == "train" and self._micro is not None:  # a pass of a micro-batch (begin_micro)
            batch["z0"] = self._micro["z0"]
        return batch

    def compute(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.reference is None:
            raise RuntimeError("no reference: KTO's reference was not set up")
        share = self.cfg.training.share_prefix
        records = batch["records"]
        b = len(records)
        if "z0" in batch:  # a pass of a micro-batch: z0 fixed (begin_micro), only the matched half is scored
            prompts, own = [r.prompt_ids for r in records], [r.completion_ids for r in records]
            logps = completion_logps(model, prompts, own, self.pad_token_id, share)  # (B,)
            ref = self.reference.completion_logps(prompts, own, self.pad_token_id, share).to(logps.device)
            sums = {}
        else:
            pairs = kl_pairs(records)
            logps = pair_logps(model, pairs, self.pad_token_id, share)  # (2B,) [matched..., mismatched...]
            ref = self.reference.pair_logps(pairs, self.pad_token_id, share).to(logps.device)  # (2B,)
            sums = {"kl_sum": (logps[b:].detach() - ref[b:]).double().sum().item(), "kl_count": float(b)}
        labels = batch["labels"].to(logps.device)  # (B,)
        policy = logps[:b].detach().double()
        r = policy - ref[:b].double()  # (B,)
        beta = self.cfg.method_config.beta
        for side, mask in (("chosen", labels), ("rejected", ~labels)):
            sums[f"{side}_count"] = float(mask.sum())
            sums[f"{side}_rewards"] = (beta * r[mask]).sum().item()
            sums[f"{side}_logps"] = policy[mask].sum().item()
        if model.training and self.reduce is not None:  # every process the same z0 (eval: all see all data)
            sums = self.reduce(sums)
        z0 = batch["z0"] if "z0" in batch else kto_reference_point(sums["kl_sum"], sums["kl_count"])
        out = kto_loss(logps[:b], ref[:b], labels, z0, **vars(self.cfg.method_config))

        def mean(side: str, what: str) -> float:
            n = sums[f"{side}_count"]
            return sums[f"{side}_{what}"] / n if n > 0 else math.nan

        metrics = {
            "loss": out.losses.detach().double().mean().item(),
            "rewards/chosen": mean("chosen", "rewards"),
            "rewards/rejected": mean("rejected", "rewards"),
            "rewards/margins": mean("chosen", "rewards") - mean("rejected", "rewards"),
            "logps/chosen": mean("chosen", "logps"),
            "logps/rejected": mean("rejected", "logps"),
            "kl": float(z0),
            "desirable_fraction": labels.double().mean().item(),
        }
        return out.losses, metrics
