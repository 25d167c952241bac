"""The data types that flow rows -> examples -> batch.

A *row* is a plain dict read from a file, after column mapping: ``prompt``, ``chosen``,
``rejected`` (strings, or lists of ``{"role", "content"}`` messages), optionally
``score_chosen``, ``score_rejected`` and ``margin``. Every row carries ``_source``: a
human-readable location such as ``"data/train.jsonl line 12"`` used in error messages.

An *example* is one tokenised pair (:class:`PairExample`); a *batch* is the dict made
by :func:`preftune.data.collate.collate_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad input data. The message names the file, the record and the field."""


@dataclass(frozen=True)
class PairExample:
    """One tokenised preference pair.

    ``chosen_ids`` / ``rejected_ids`` are response tokens only and end with exactly one
    EOS token (unless truncation cut it off). ``prompt_ids`` holds the prompt tokens,
    including the chat template's generation prompt for conversational data and the
    BOS token where the tokenizer adds one (never twice).
    """

    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    score_chosen: float | None = None
    score_rejected: float | None = None
    margin: float | None = None
    source: str = ""
    truncated: bool = False
