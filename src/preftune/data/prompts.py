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

from preftune.data.checks import MAX_SHOWN, problems_message, text_kind
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


def prompt_row_problems(row: dict, index: int) -> list[str]:
    """What is wrong with one prompt row (``index``: its position, named when the row has no ``_source``),
    each problem "<file> line <n>: ..."; [] for a good row. The rule of :func:`validate_prompt_rows` and of a
    streamed row (:class:`preftune.data.stream.PromptProcessor`)."""
    source = row.get("_source", f"row {index}")
    if "prompt" not in row:
        return [f"{source}: field 'prompt': missing"]
    problems = []
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
    return problems


def validate_prompt_rows(rows: list[dict], *, max_errors: int = MAX_SHOWN) -> None:
    """Raise :class:`DataError` listing up to ``max_errors`` bad rows, each with its file and line."""
    problems = [p for i, row in enumerate(rows) for p in prompt_row_problems(row, i)]
    if problems:
        raise DataError(problems_message(problems[:max_errors], len(problems), len(rows)))


def tokenize_prompt(
    row: dict, tokenizer, index: int, *, max_prompt_length: int
) -> tuple[PromptExample, bool]:
    """One checked prompt row -> (its :class:`PromptExample` with ``index``, whether it was truncated): the chat
    template for messages; the last ``max_prompt_length`` tokens kept. A prompt of no tokens is a
    :class:`DataError` naming its file and line."""
    source = row.get("_source", f"row {index}")
    ids = prompt_ids(tokenizer, row["prompt"])
    if not ids:
        raise DataError(f"{source}: field 'prompt': tokenises to no tokens")
    truncated = len(ids) > max_prompt_length
    if truncated:
        ids = ids[len(ids) - max_prompt_length :]
    columns = {k: v for k, v in row.items() if k not in ("prompt", "_source")}
    return PromptExample(index, row["prompt"], tuple(ids), columns, source), truncated


def tokenize_prompts(
    rows: list[dict], tokenizer, *, max_prompt_length: int
) -> tuple[list[PromptExample], PromptStats]:
    """Tokenise every prompt (:func:`tokenize_prompt`); ``stats`` counts them and the truncated ones."""
    examples, stats = [], PromptStats(total=len(rows))
    for i, row in enumerate(rows):
        example, truncated = tokenize_prompt(row, tokenizer, i, max_prompt_length=max_prompt_length)
        stats.truncated += truncated
        examples.append(example)
    return examples, stats


def prompt_stats_dict(stats: PromptStats) -> dict:
    return dataclasses.asdict(stats)
