"""Unpaired data (KTO): rows ``prompt``, ``completion``, ``label`` -> :class:`UnpairedExample` -> batch.

The format is TRL's unpaired preference format: ``prompt`` and ``completion`` are strings, or lists of
``{"role", "content"}`` messages (the completion ending with an ``assistant`` message), and ``label`` is a
boolean, true for a desirable completion. Optionally ``prompt_ids``/``completion_ids`` hold the token ids
(used exactly as given, as for pairs). Tokenisation and truncation follow the pair rules of
:mod:`preftune.data.tokenize` with the one completion in place of the two responses; a completion with no
token besides its EOS is dropped (counted in ``dropped_empty``).

Pair data (``prompt``, ``chosen``, ``rejected``) is accepted too: :func:`pairs_to_unpaired` turns each
tokenised pair into one desirable record (its chosen) and one undesirable record (its rejected), each
keeping the pair's ``source`` with ``(chosen)`` / ``(rejected)`` appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preftune.data.checks import MAX_SHOWN, assistant_last, raise_problems, text_fields
from preftune.data.collate import pack_sequences
from preftune.data.tokenize import (
    MAX_NAMED_DROPS,
    TokenizeStats,
    _apply_template,
    _render_response,
    _require_chat_template,
    prompt_ids,
    response_ids,
)
from preftune.data.types import DataError, PairExample


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenised unpaired record: ``completion_ids`` are completion tokens only (one EOS at the end unless
    truncation cut it off); ``label`` True = desirable."""

    index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    label: bool
    source: str = ""
    truncated: bool = False


def is_unpaired(rows: Sequence[dict]) -> bool:
    """Whether ``rows`` are unpaired data: some row has a ``completion`` (or ``completion_ids``)."""
    return any("completion" in r or "completion_ids" in r for r in rows)


def validate_unpaired_rows(rows: list[dict], *, max_errors: int = MAX_SHOWN) -> None:
    """Check every unpaired row; raise one :class:`DataError` listing up to ``max_errors`` problems, each
    ``"<_source>: field '<name>': <what is wrong>"`` (a missing or non-boolean label, a missing or empty
    prompt or completion, a string prompt with a message-list completion, ...)."""
    raise_problems(unpaired_problems(rows), len(rows), max_errors)


def unpaired_problems(rows: list[dict]) -> list[str]:
    """Every problem of unpaired ``rows`` (:func:`unpaired_row_problems` of each, in order)."""
    return [p for i, row in enumerate(rows) for p in unpaired_row_problems(row, i)]


def unpaired_row_problems(row: dict, i: int) -> list[str]:
    """What is wrong with unpaired row ``i`` (``"<_source>: field '<name>': <what>"`` each; empty when good)."""
    source = row.get("_source", f"row {i}")
    problems: list[str] = []

    def bad(field: str, what: str) -> None:
        problems.append(f"{source}: field {field!r}: {what}")

    optional = ("completion",) if "completion_ids" in row else ()
    kinds = text_fields(row, ("prompt", "completion"), bad, optional=optional)
    if len(kinds) == 2 and kinds["prompt"] != kinds["completion"]:
        bad("completion", f"is a {kinds['completion']} value but 'prompt' is a {kinds['prompt']} value")
    assistant_last(row, kinds, ("completion",), bad)
    if "label" not in row:
        bad("label", "missing (true for a desirable completion, false for an undesirable one)")
    elif not isinstance(row["label"], bool):
        bad("label", f"must be true or false, got {type(row['label']).__name__} {row['label']!r}")
    for field in ("prompt_ids", "completion_ids"):
        if ("prompt_ids" in row or "completion_ids" in row) and field not in row:
            bad(field, "missing (pre-tokenised rows need prompt_ids and completion_ids)")
        value = row.get(field)
        if value is not None and not (
            isinstance(value, list)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
        ):
            bad(field, "must be a list of non-negative token ids")
    return problems


def check_labels(
    examples: Sequence[UnpairedExample], where: str, desirable_weight: float, undesirable_weight: float
) -> None:
    """Both labels must be present when both weights are > 0 (a weight of 0 switches that side off)."""
    n_d = sum(e.label for e in examples)
    n_u = len(examples) - n_d
    if desirable_weight > 0 and undesirable_weight > 0 and (n_d == 0 or n_u == 0):
        first = examples[0].source if examples else where
        missing = "undesirable (label false)" if n_u == 0 else "desirable (label true)"
        raise DataError(
            f"{where} (first record {first}): {n_d} desirable and {n_u} undesirable records: no {missing} "
            "record, but kto.desirable_weight and kto.undesirable_weight are both > 0. Add records of the "
            "other label, or set the other label's weight to 0 to train on one label only"
        )


def _tokenize_one(row: dict, tokenizer, *, max_length: int, max_prompt_length: int):
    source = row["_source"]
    if "completion_ids" in row:  # pre-tokenised: used exactly as given
        p, c = list(row["prompt_ids"]), list(row["completion_ids"])
        if not p:
            if tokenizer.bos_token_id is None:
                raise DataError(f"{source}: field 'prompt_ids': empty, and the tokenizer has no BOS token")
            p = [tokenizer.bos_token_id]
    elif isinstance(row["prompt"], str):
        p, c = prompt_ids(tokenizer, row["prompt"]), response_ids(tokenizer, row["completion"])
    else:
        _require_chat_template(tokenizer, f"{source}: conversational data")
        prompt_text = _apply_template(tokenizer, row["prompt"], add_generation_prompt=True)
        p = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        c = response_ids(
            tokenizer, _render_response(tokenizer, prompt_text, row["prompt"], row["completion"], source)
        )
    prompt_cut = response_cut = False
    if len(p) + len(c) > max_length:  # the pair rule: the prompt keeps its end, then the completion its start
        if len(p) > max_prompt_length:
            p, prompt_cut = p[len(p) - max_prompt_length :], True
        if len(c) > max_length - len(p):
            c, response_cut = c[: max_length - len(p)], True
    return p, c, prompt_cut, response_cut


def tokenize_unpaired_rows(
    rows: list[dict], tokenizer, *, max_length: int, max_prompt_length: int
) -> tuple[list[UnpairedExample], TokenizeStats]:
    """Tokenise validated unpaired rows; kept examples get ``index`` 0..kept-1 in order."""
    examples: list[UnpairedExample] = []
    stats = TokenizeStats()
    for i, row in enumerate(rows):
        row = row if "_source" in row else {**row, "_source": f"row {i}"}
        example = tokenize_unpaired_row(
            row, tokenizer, len(examples), stats, max_length=max_length, max_prompt_length=max_prompt_length
        )
        if example is not None:
            examples.append(example)
    return examples, stats


def tokenize_unpaired_row(
    row: dict, tokenizer, index: int, stats: TokenizeStats, *, max_length: int, max_prompt_length: int
) -> UnpairedExample | None:
    """One validated unpaired row (with its ``_source``) as example ``index``, or None when its completion has no
    token besides its EOS (dropped); counted in ``stats``."""
    p, c, prompt_cut, response_cut = _tokenize_one(
        row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
    )
    stats.total += 1
    stats.prompt_truncated += prompt_cut
    stats.response_truncated += response_cut
    if c in ([], [tokenizer.eos_token_id]):
        stats.dropped_empty += 1
        if len(stats.dropped) < MAX_NAMED_DROPS:
            stats.dropped.append(f"{row['_source']}: dropped, the completion has no token besides its EOS")
        return None
    stats.kept += 1
    return UnpairedExample(index, tuple(p), tuple(c), bool(row["label"]), row["_source"], response_cut)


def pairs_to_unpaired(pairs: Sequence[PairExample]) -> list[UnpairedExample]:
    """Each pair -> a desirable record (prompt, chosen) then an undesirable one (prompt, rejected)."""
    out: list[UnpairedExample] = []
    for p in pairs:
        for ids, label, which in ((p.chosen_ids, True, "chosen"), (p.rejected_ids, False, "rejected")):
            out.append(
                UnpairedExample(len(out), p.prompt_ids, ids, label, f"{p.source} ({which})", p.truncated)
            )
    return out


def collate_unpaired(examples: Sequence[UnpairedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch ``B`` records: ``input_ids``, ``attention_mask`` (B, T) long and ``response_mask`` (B, T) bool of
    the (prompt, completion) rows (:func:`pack_sequences`); ``index`` (B,) long; ``labels`` (B,) bool;
    ``completion_lengths`` (B,) long."""
    if not examples:
        raise ValueError("collate_unpaired needs at least one example")
    packed = pack_sequences(
        [e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_token_id
    )
    return {
        **packed,
        "index": torch.tensor([e.index for e in examples], dtype=torch.long),
        "labels": torch.tensor([e.label for e in examples], dtype=torch.bool),
        "completion_lengths": torch.tensor([len(e.completion_ids) for e in examples], dtype=torch.long),
    }
