"""The data layer: rows -> examples -> batch (load, validate, tokenise, collate) for pair data and prompt
data, and unpaired data (KTO: ``data/unpaired.py``). See docs/data.md."""

from preftune.data.checks import split_rows, validate_rows
from preftune.data.collate import collate_pairs, collate_prompts, pack_sequences, pack_shared_prefix
from preftune.data.load import FIELDS, iter_rows, load_rows
from preftune.data.prompts import PromptExample, PromptStats, tokenize_prompts, validate_prompt_rows
from preftune.data.tokenize import (
    TokenizeStats,
    prompt_ids,
    response_ids,
    split_implicit_prompt,
    tokenize_pair,
    tokenize_rows,
)
from preftune.data.types import DataError, PairExample
from preftune.data.unpaired import (
    UnpairedExample,
    check_labels,
    collate_unpaired,
    is_unpaired,
    pairs_to_unpaired,
    tokenize_unpaired_rows,
    validate_unpaired_rows,
)

__all__ = [
    "FIELDS",
    "DataError",
    "PairExample",
    "PromptExample",
    "PromptStats",
    "TokenizeStats",
    "UnpairedExample",
    "check_labels",
    "collate_unpaired",
    "is_unpaired",
    "pairs_to_unpaired",
    "tokenize_unpaired_rows",
    "validate_unpaired_rows",
    "collate_pairs",
    "collate_prompts",
    "pack_sequences",
    "pack_shared_prefix",
    "iter_rows",
    "load_rows",
    "prompt_ids",
    "response_ids",
    "split_implicit_prompt",
    "split_rows",
    "tokenize_pair",
    "tokenize_prompts",
    "tokenize_rows",
    "validate_prompt_rows",
    "validate_rows",
]
