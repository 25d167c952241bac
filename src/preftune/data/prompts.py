"""Prompt data sets for online training: rows -> :class:`PromptExample`.

A row has a ``prompt`` (a non-empty string to continue, or a list of ``{role, content}`` messages, to which
the chat template's generation prompt is added) and any other columns (a reference answer, a target),
which are handed to the reward functions by name. Files are read by :func:`preftune.data.load_rows` with
``keep_all=True`` (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.txt`` with one prompt per line, a
``save_to_disk`` folder, a hub id, or ``builtin:movie_reviews_train``).

Tokenisation is the data layer's prompt rule (:func:`preftune.data.prompt_ids`); a prompt longer than
``max_prompt_length`` keeps its **last** tokens (those nearest the completion), counted in ``truncated``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from preftune.data.checks import text_kind
from preftune.data.tokenize import prompt_ids
from preftune.data.types import DataError

# names a reward function already receives: a data column may not take them
RESERVED_COLUMNS = frozenset({"prompts", "completions", "completion_ids", "prompt_ids"})


@dataclass(frozen=True)
class PromptExample:
    index: int
    prompt: str | list  # the text, or the messages
    prompt_ids: tuple[int, ...]
    columns: dict  # the row's other columns, for the reward functions
    source: str = ""


@dataclass
class PromptStats:
    total: int = 0
    truncated: int = 0


def validate_prompt_rows(rows: list[dict], *, max_errors: int = 10) -> None:
    """Raise :class:`DataError` listing up to ``max_errors`` bad rows, each with its file and line."""
    problems = []
    for i, row in enumerate(rows):
        source = row.get("_source", f"row {i}")
        if "prompt" not in row:
            problems.append(f"{source}: field 'prompt': missing")
            continue
        kind, what = text_kind(row["prompt"])
        if what:
            problems.append(f"{source}: field 'prompt': {what}")
        elif kind == "messages" and row["prompt"][-1]["role"] == "assistant":
            problems.append(
                f"{source}: field 'prompt': the last message is the assistant's; the completion is generated "
                "after the prompt, so it must end with a user (or system) message"
            )
        clash = sorted(RESERVED_COLUMNS & set(row))
        if clash:
            problems.append(f"{source}: column(s) {clash} clash with the reward functions' own arguments")
    if problems:
        shown = problems[:max_errors]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(f"{len(problems)} problem(s) in the prompt data:\n  " + "\n  ".join(shown) + more)


def tokenize_prompts(
    rows: list[dict], tokenizer, *, max_prompt_length: int
) -> tuple[list[PromptExample], PromptStats]:
    """Tokenise every prompt (chat template for messages); keep the last ``max_prompt_length`` tokens."""
    examples, stats = [], PromptStats(total=len(rows))
    for i, row in enumerate(rows):
        source = row.get("_source", f"row {i}")
        ids = prompt_ids(tokenizer, row["prompt"])
        if not ids:
            raise DataError(f"{source}: field 'prompt': tokenises to no tokens")
        if len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length :]
            stats.truncated += 1
        columns = {k: v for k, v in row.items() if k not in ("prompt", "_source")}
        examples.append(PromptExample(i, row["prompt"], tuple(ids), columns, source))
    return examples, stats


def prompt_stats_dict(stats: PromptStats) -> dict:
    return dataclasses.asdict(stats)
