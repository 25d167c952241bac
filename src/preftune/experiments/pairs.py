"""Scored samples -> preference pairs (DPO paper §6.1, ODPO paper §4).

Input: one record per prompt, ``{"prompt": str, "responses": [str, ...], "scores":
[float, ...]}`` (K responses and their rewards). Output rows, ready for the pair
trainer: ``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}`` with
``score_chosen > score_rejected`` always (both scores are kept for ODPO's offset).

Modes:

- ``"all"``: every unordered pair of distinct responses to one prompt whose scores
  differ, as in both papers: up to K(K-1)/2 pairs per prompt.
- ``"best_vs_worst"``: one pair per prompt, the highest-scored response against the
  lowest (first occurrence wins a tie for max or min); none when all scores tie.

Our conventions: identical response texts are never paired. Within a prompt only the
first occurrence of a text is kept (counted in ``duplicates_dropped``), so a repeated
sample neither pairs with itself nor doubles the weight of its pairs. Pairs with equal
scores carry no preference and are dropped (``ties_dropped``: such pairs in ``"all"``
mode; in ``"best_vs_worst"`` mode, 1 per prompt whose remaining responses all tie).
Order is deterministic: records in input order, then response index pairs (i, j),
i < j, in lexicographic order.

:func:`subsample_pairs` keeps a fixed-size subset (the "little data" runs of the ODPO paper): the first N
pairs after a seeded shuffle, so the subset is the same on every machine and rerun.

:func:`label_by_median` turns the same scored samples into KTO's unpaired records instead: each response is
desirable when its score is above its prompt's median score, undesirable when below; a response at the
median carries no preference and is left out (``at_median_dropped``). Repeated texts are dropped as for
pairs (first occurrence kept), before the median is taken.
"""

from __future__ import annotations

import math
import random
import statistics

MODES = ("all", "best_vs_worst")

__all__ = ["MODES", "build_pairs", "label_by_median", "subsample_pairs"]


def _unique(record: dict, index: int) -> tuple[list[str], list[float], int]:
    """Validate one record; return its responses and scores with repeated texts removed."""
    for key in ("prompt", "responses", "scores"):
        if key not in record:
            raise ValueError(f"record {index}: missing key {key!r}")
    responses, scores = list(record["responses"]), [float(s) for s in record["scores"]]
    if len(responses) != len(scores):
        raise ValueError(f"record {index}: {len(responses)} responses but {len(scores)} scores")
    for j, s in enumerate(scores):
        if not math.isfinite(s):
            raise ValueError(f"record {index}: score {j} is not finite ({s})")
    seen: set[str] = set()
    texts, values = [], []
    for text, score in zip(responses, scores):
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        values.append(score)
    return texts, values, len(responses) - len(texts)


def _row(prompt: str, a: str, sa: float, b: str, sb: float) -> dict:
    if sa < sb:
        a, sa, b, sb = b, sb, a, sa
    return {"prompt": prompt, "chosen": a, "rejected": b, "score_chosen": sa, "score_rejected": sb}


def build_pairs(records: list[dict], mode: str = "all") -> tuple[list[dict], dict]:
    """Build preference pairs from scored samples.

    Args:
        records: ``[{"prompt": str, "responses": [str] * K, "scores": [float] * K}, ...]``.
        mode: ``"all"`` or ``"best_vs_worst"`` (see the module docstring).

    Returns:
        ``(rows, stats)``: rows ``{"prompt", "chosen", "rejected", "score_chosen",
        "score_rejected"}`` with ``score_chosen > score_rejected``; stats ``{"prompts",
        "pairs", "ties_dropped", "prompts_without_pair", "duplicates_dropped"}``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pair mode {mode!r}; expected one of {MODES}")
    rows: list[dict] = []
    ties = without = duplicates = 0
    for index, record in enumerate(records):
        prompt = record.get("prompt")
        texts, scores, dup = _unique(record, index)
        duplicates += dup
        before = len(rows)
        if mode == "all":
            for i in range(len(texts)):
                for j in range(i + 1, len(texts)):
                    if scores[i] == scores[j]:
                        ties += 1
                    else:
                        rows.append(_row(prompt, texts[i], scores[i], texts[j], scores[j]))
        elif len(texts) >= 2:
            hi = max(range(len(scores)), key=lambda i: scores[i])  # first index of the max
            lo = min(range(len(scores)), key=lambda i: scores[i])  # first index of the min
            if scores[hi] == scores[lo]:
                ties += 1
            else:
                i, j = sorted((hi, lo))
                rows.append(_row(prompt, texts[i], scores[i], texts[j], scores[j]))
        if len(rows) == before:
            without += 1
    stats = {
        "prompts": len(records),
        "pairs": len(rows),
        "ties_dropped": ties,
        "prompts_without_pair": without,
        "duplicates_dropped": duplicates,
    }
    return rows, stats


def subsample_pairs(rows: list, max_pairs: int | None, seed: int) -> list:
    """The first ``max_pairs`` rows after a shuffle seeded by ``seed``, kept in their original order.

    A random subset rather than the first N rows, which would be the first few prompts only; seeded, so the
    subset is fixed. ``None`` or a cap of at least ``len(rows)`` keeps every row.
    Example: 5 rows, max_pairs 2 -> two of the five rows, the same two for the same seed.
    """
    if max_pairs is None or max_pairs >= len(rows):
        return list(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:max_pairs])]


def label_by_median(records: list[dict]) -> tuple[list[dict], dict]:
    """KTO's unpaired records from scored samples: per prompt, each (distinct) response above the median of
    the prompt's scores is desirable (``label`` true), each below it undesirable; one at the median is left
    out. Records come in input order, then response order.

    Args:
        records: ``[{"prompt": str, "responses": [str] * K, "scores": [float] * K}, ...]``.

    Returns:
        ``(rows, stats)``: rows ``{"prompt", "completion", "label", "score", "median"}``; stats ``{"prompts",
        "desirable", "undesirable", "at_median_dropped", "duplicates_dropped"}``.

    Example: scores [1, 2, 3, 4] (median 2.5) -> 3 and 4 desirable, 1 and 2 undesirable; scores [1, 2, 3]
    (median 2) -> 3 desirable, 1 undesirable, 2 left out.
    """
    rows: list[dict] = []
    at_median = duplicates = 0
    for index, record in enumerate(records):
        texts, scores, dup = _unique(record, index)
        duplicates += dup
        if not texts:
            continue
        median = statistics.median(scores)
        for text, score in zip(texts, scores):
            if score == median:
                at_median += 1
                continue
            rows.append(
                {
                    "prompt": record["prompt"],
                    "completion": text,
                    "label": score > median,
                    "score": score,
                    "median": median,
                }
            )
    desirable = sum(r["label"] for r in rows)
    stats = {
        "prompts": len(records),
        "desirable": desirable,
        "undesirable": len(rows) - desirable,
        "at_median_dropped": at_median,
        "duplicates_dropped": duplicates,
    }
    return rows, stats
