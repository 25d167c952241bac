"""Prompts for the controlled sentiment experiment: openings of movie reviews.

The built-in sets (``builtin:movie_reviews_train`` and ``builtin:movie_reviews_heldout``, package data of
:mod:`preftune.data`, also usable as ``data.train`` of an online training run) are openings written for this
project (the IMDB data set the DPO and ODPO papers use cannot be downloaded here). Each opening is 4-14 words
of neutral text that stops mid-sentence ("I watched this film last Sunday with my brother, and"), so the
model, not the prompt, decides the sentiment. Genre words (horror, comedy, war) do appear; the reward scores
the response only, never the prompt. The train and held-out lists are fixed and disjoint: 255 training
openings and 85 held-out openings used only for evaluation. An experiment may set aside a seeded share of
its training prompts for validation (:func:`split_validation`): they are never trained on, and settings are
chosen on them so that the held-out prompts judge each chosen setting once.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from ..data.load import BUILTIN, load_rows, prompt_lines, read_text

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")


def load_prompts(path: str | Path | None = None, split: Split = "train") -> list[str]:
    """Load review openings, one per line.

    Args:
        path: a UTF-8 text file with one prompt per line (blank lines and lines starting
            with ``#`` are skipped; surrounding whitespace is stripped), or ``None`` for
            the built-in set of ``split``.
        split: ``"train"`` or ``"heldout"``; selects the built-in list when ``path`` is
            ``None`` and is ignored for a user file (the file is the split).

    Raises:
        ValueError: unknown split, or a file with no prompts (the message names it).
        FileNotFoundError: ``path`` does not exist.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {SPLITS}")
    if path is None:
        name = f"{BUILTIN}movie_reviews_{split}"
        rows = load_rows(name)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        name = str(path)
        rows = prompt_lines(read_text(path), name)
    if not rows:
        raise ValueError(f"prompt file {name} contains no prompts (only blank lines or '#' comments)")
    return [row["prompt"] for row in rows]


def split_validation(prompts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Set aside ``round(fraction · n)`` of ``prompts`` (at least one when ``fraction`` > 0) for validation.

    The validation prompts are drawn by a shuffle seeded by ``seed``; both parts keep the prompts' order, and
    ``fraction`` 0 returns ``(prompts, [])``. Example: 8 prompts at 0.25 -> 6 training and 2 validation
    prompts, the same two for the same seed.

    Raises:
        ValueError: ``fraction`` outside [0, 1), or no training prompt left.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(prompts), []
    n_val = max(1, round(fraction * len(prompts)))
    if n_val >= len(prompts):
        raise ValueError(
            f"a validation fraction of {fraction} of {len(prompts)} training prompts leaves none to train on"
        )
    picked = set(random.Random(seed).sample(range(len(prompts)), n_val))
    train = [p for i, p in enumerate(prompts) if i not in picked]
    return train, [p for i, p in enumerate(prompts) if i in picked]
