"""Checks and splits of loaded preference rows (:mod:`preftune.data.load` reads them): every row's fields
(:func:`row_problems`, collected by :func:`validate_rows` into one error naming each record's file and line),
the kind of a text field (:func:`text_kind`: a string or a conversation), and the split of rows into train and
eval by prompt (:func:`split_rows`)."""

from __future__ import annotations

import json
import math
import random
from numbers import Real
from typing import Any

from preftune.data.load import ID_FIELDS, MESSAGE_KEYS, NUMBER_FIELDS, TEXT_FIELDS
from preftune.data.tokenize import split_implicit_prompt
from preftune.data.types import DataError

MAX_SHOWN = 20  # problems a message lists (then "... and N more")

# --- validation ----------------------------------------------------------------------------------------


def validate_rows(
    rows: list[dict],
    *,
    require_scores: bool = False,
    require_margin: bool = False,
    max_errors: int = MAX_SHOWN,
) -> None:
    """Check every row; raise one :class:`DataError` listing up to ``max_errors`` problems.

    Each problem reads ``"<_source>: field '<name>': <what is wrong>"``. Accepted formats:
    standard (``prompt``/``chosen``/``rejected`` non-empty strings), conversational (all three
    non-empty lists of ``{"role": str, "content": str}`` messages) and implicit prompt (no
    ``prompt``; ``chosen`` and ``rejected`` are full conversations sharing a prefix, see
    :func:`preftune.data.tokenize.split_implicit_prompt`).
    """
    raise_problems(pair_problems(rows, require_scores=require_scores, require_margin=require_margin), len(rows),
                   max_errors)  # fmt: skip


def pair_problems(
    rows: list[dict], *, require_scores: bool = False, require_margin: bool = False
) -> list[str]:
    """Every problem of ``rows`` (:func:`row_problems` of each, in order)."""
    return [
        p
        for i, row in enumerate(rows)
        for p in row_problems(row, i, require_scores=require_scores, require_margin=require_margin)
    ]


def raise_problems(problems: list[str], rows: int, max_errors: int = MAX_SHOWN) -> None:
    """One :class:`DataError` for ``problems`` found in ``rows`` rows (:func:`problems_message`), if any."""
    if problems:
        raise DataError(problems_message(problems[:max_errors], len(problems), rows))


def problems_message(shown: list[str], count: int, rows: int) -> str:
    """The one message of bad rows: the count, the ``shown`` problems one a line, then how many more."""
    lines = [f"{count} problem(s) in {rows} row(s):"] + [f"  {p}" for p in shown]
    if count > len(shown):
        lines.append(f"  ... and {count - len(shown)} more")
    return "\n".join(lines)


def row_problems(row: dict, i: int, *, require_scores: bool, require_margin: bool) -> list[str]:
    source = row.get("_source", f"row {i}")
    problems: list[str] = []

    def bad(field: str, what: str) -> None:
        problems.append(f"{source}: field {field!r}: {what}")

    kinds = text_fields(row, TEXT_FIELDS, bad, optional=("prompt",))

    if "prompt" not in row and kinds.get("chosen") == kinds.get("rejected") == "string":
        bad("prompt", "missing (only conversational data may leave the prompt implicit)")
    reference = "prompt" if "prompt" in row else "chosen"
    for field in ("chosen", "rejected"):
        if field != reference and reference in kinds and field in kinds and kinds[field] != kinds[reference]:
            bad(field, f"is {_a(kinds[field])} but {reference!r} is {_a(kinds[reference])}")
    assistant_last(row, kinds, ("chosen", "rejected"), bad)

    if not problems and "prompt" not in row:
        try:
            split_implicit_prompt(row)
        except DataError as e:
            problems.append(str(e))

    for field in NUMBER_FIELDS:
        if field in row:
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, Real):
                bad(field, f"must be a number, got {type(value).__name__} {value!r}")
            elif not _finite(value):
                bad(field, f"must be finite, got {str(value)[:30]}")
    present = [f for f in ID_FIELDS if f in row]
    if present:
        for field in ID_FIELDS:
            value = row.get(field)
            if value is None:
                bad(field, f"missing (pre-tokenised rows need all of {', '.join(ID_FIELDS)})")
            elif not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
            ):
                bad(field, "must be a list of non-negative token ids")
            elif field != "prompt_ids" and not value:
                bad(field, "empty")
    if require_scores:
        for field in ("score_chosen", "score_rejected"):
            if field not in row:
                bad(field, "missing (this method needs scores)")
    if require_margin and "margin" not in row:
        bad("margin", "missing (this method needs a margin)")
    return problems


def _finite(value: Real) -> bool:
    """Finite and representable as a float (an integer with 400 digits is neither)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def text_fields(row: dict, fields, bad, *, optional=()) -> dict[str, str]:
    """``{field: "string" | "messages"}`` for the well-formed text ``fields`` of ``row``; each malformed one,
    and each missing one not in ``optional``, is reported as ``bad(field, what is wrong)``."""
    kinds: dict[str, str] = {}
    for field in fields:
        if field not in row:
            if field not in optional:
                bad(field, "missing")
            continue
        kind, what = text_kind(row[field])
        if what:
            bad(field, what)
        else:
            kinds[field] = kind
    return kinds


def assistant_last(row: dict, kinds: dict[str, str], fields, bad) -> None:
    """A response given as messages must end with the assistant's message (the one that is trained on)."""
    for field in fields:
        if kinds.get(field) == "messages" and row[field][-1]["role"] != "assistant":
            bad(field, f"the last message must have role 'assistant', not {row[field][-1]['role']!r}")


def text_kind(value: Any) -> tuple[str, str]:
    """``("string" | "messages", "")`` for a good value, ``("", what is wrong)`` otherwise."""
    if isinstance(value, str):
        return ("string", "") if value.strip() else ("", "empty text")
    if isinstance(value, list):
        if not value:
            return "", "empty list of messages"
        for k, message in enumerate(value):
            if not isinstance(message, dict):
                return (
                    "",
                    f"message {k}: must be an object with 'role' and 'content', got {type(message).__name__}",
                )
            unknown = sorted(set(message) - MESSAGE_KEYS)
            if unknown:
                return "", f"message {k}: unknown key(s) {unknown}; messages have only 'role' and 'content'"
            for key in ("role", "content"):
                if key not in message:
                    return "", f"message {k}: missing {key!r}"
                if not isinstance(message[key], str):
                    return "", f"message {k}: {key!r} must be a string, got {type(message[key]).__name__}"
            if not message["role"]:
                return "", f"message {k}: empty role"
        if not value[-1]["content"].strip():
            return "", f"message {len(value) - 1}: empty content"
        return "messages", ""
    return "", (
        "must be a non-empty string or a non-empty list of {'role', 'content'} messages, "
        f"got {type(value).__name__}"
    )


def _a(kind: str) -> str:
    return "a string" if kind == "string" else "a list of messages"


# --- splitting -----------------------------------------------------------------------------------------


def _prompt_key(row: dict, i: int) -> str:
    """Rows with the same prompt share a key; a row whose prompt cannot be read is its own group."""
    prompt = row.get("prompt")
    if prompt is None:
        try:
            prompt = split_implicit_prompt(row)["prompt"]
        except (DataError, TypeError, AttributeError):
            return f"row {i}"
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_rows(rows: list[dict], *, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, eval) **by prompt**: every row of a prompt lands on the same side, so the eval
    split measures prompts the model was not trained on. Each part keeps the original order.

    Prompt groups are shuffled with ``seed`` and moved to eval, each one that brings it closer to
    ``round(len(rows) * eval_fraction)`` rows (a group that would overshoot is passed over): at least one group when ``eval_fraction > 0``, and never
    every group, so train is never empty (a single prompt always goes to train). ``eval_fraction`` must be
    in ``[0, 1)``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_prompt_key(row, i), []).append(i)
    members = list(groups.values())
    n = len(rows)
    target = min(max(1, round(n * eval_fraction)), n - 1) if eval_fraction > 0 and n > 1 else 0
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    eval_indices: set[int] = set()
    taken = 0
    for g in order:
        have, size = len(eval_indices), len(members[g])
        if have >= target or taken == len(members) - 1:  # leave at least one group for train
            break
        if have > 0 and have + size - target > target - have:
            continue  # it would overshoot more than stopping undershoots: try the next (smaller) groups
        eval_indices.update(members[g])
        taken += 1
    train = [row for i, row in enumerate(rows) if i not in eval_indices]
    evaluation = [row for i, row in enumerate(rows) if i in eval_indices]
    return train, evaluation
