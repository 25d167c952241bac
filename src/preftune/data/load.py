"""Load preference rows from files, ``save_to_disk`` folders or the hub; validate and split them.

A row is a plain dict with our field names (:data:`FIELDS`) plus ``_source``, a human-readable
location used in every error message:

====================  ==========================================================
source                ``_source``
====================  ==========================================================
``.jsonl`` (and       ``"<path> line N"``, 1-based; blank lines are skipped but
JSON Lines ``.json``) counted
``.json`` (a list)    ``"<path> record N"``, 0-based
``.csv``              ``"<path> line N"``, the header is line 1
``.parquet``          ``"<path> record N"``, 0-based
``save_to_disk``      ``"<path> record N"``, 0-based (a DatasetDict: the ``split``)
hub id                ``"<owner/name> [<split>] record N"``, 0-based
====================  ==========================================================

Missing values (JSON ``null``, parquet nulls, empty CSV cells) count as absent fields.
CSV cells are strings, so conversational data (lists of messages) cannot be stored in CSV;
the score and margin columns are converted to floats, a ``label`` cell ``true``/``false`` (any case) to a
boolean.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from preftune.data.types import DataError

FIELDS: tuple[str, ...] = (
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "margin",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion",  # unpaired data (KTO): prompt, completion, label
    "label",
    "completion_ids",
)
ID_FIELDS: tuple[str, ...] = ("prompt_ids", "chosen_ids", "rejected_ids")  # optional pre-tokenised form
TEXT_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
NUMBER_FIELDS: tuple[str, ...] = ("score_chosen", "score_rejected", "margin")
MESSAGE_KEYS: frozenset[str] = frozenset({"role", "content"})

_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
KEEP_ALL = "*"  # in a column mapping: keep every column, not only our fields
BUILTIN = "builtin:"  # built-in prompt lists, package data (data/builtin/*.txt)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- loading -------------------------------------------------------------------------------------------


def load_rows(
    spec: str | os.PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    keep_all: bool = False,
) -> list[dict]:
    """Read rows from ``spec``: a file, a ``save_to_disk`` folder, a hub dataset id, or a built-in prompt
    list (``builtin:movie_reviews_train``).

    ``columns`` maps our field names to the source's column names (``{"chosen": "response_a"}``);
    fields not named keep their own name. Only our fields (and ``_source``) are kept, unless
    ``keep_all`` (prompt data sets: extra columns such as a reference answer go to reward functions).
    A ``.txt`` file holds one prompt per line (blank lines and ``#`` comments skipped).
    Rows are not validated here: call :func:`validate_rows` or :func:`validate_prompt_rows`.
    """
    mapping = _column_mapping(columns)
    if keep_all:
        mapping[KEEP_ALL] = KEEP_ALL
    name = str(spec)
    if name.startswith(BUILTIN):
        return _load_builtin(name)
    path = Path(spec)
    if path.is_dir():
        return _load_saved_dataset(path, name, mapping, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _load_json_lines(path, name, mapping)
        if suffix == ".json":
            return _load_json(path, name, mapping)
        if suffix == ".csv":
            return _load_csv(path, name, mapping)
        if suffix == ".parquet":
            return _load_parquet(path, name, mapping)
        if suffix == ".txt":
            return prompt_lines(read_text(path, name), name)
        raise DataError(
            f"{name}: unsupported file type {suffix!r}; expected one of {', '.join(_SUFFIXES)} "
            "or a folder written by datasets' save_to_disk"
        )
    if _HUB_ID.match(name) and path.suffix.lower() not in _SUFFIXES:
        return _load_hub(name, mapping, split)
    raise DataError(f"{name}: file not found (and it does not look like a hub dataset id 'owner/name')")


OnError = Callable[[str], None]  # a per-record problem (malformed JSON, a short CSV line...): report, go on


def iter_rows(
    spec: str | os.PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    keep_all: bool = False,
    on_error: OnError | None = None,
) -> Iterator[dict]:
    """The rows :func:`load_rows` reads, one at a time, never holding the file (``data.streaming``,
    ``preftune validate``): the same projection, the same ``_source`` and the same messages.

    JSONL and CSV files are read line by line, Parquet by record batches, a ``save_to_disk`` folder from its
    memory-mapped Arrow files, a hub id as an ``IterableDataset`` (``streaming=True``). A ``.json`` file
    holding one JSON list cannot be read a record at a time: :class:`DataError` (convert it to JSONL).
    A record that cannot be read (malformed JSON, not an object, bad UTF-8, a CSV line with the wrong
    number of cells or a number cell that is not one) raises :class:`DataError`, or, with ``on_error``, is
    passed to it as its message and skipped. Errors of the whole source (not found, unreadable) always raise.
    """
    mapping = _column_mapping(columns)
    if keep_all:
        mapping[KEEP_ALL] = KEEP_ALL
    name = str(spec)
    if name.startswith(BUILTIN):
        yield from _load_builtin(name)
        return
    path = Path(spec)
    if path.is_dir():
        yield from _iter_saved_dataset(path, name, mapping, split)
        return
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json" and _starts_with_list(path):
            raise DataError(
                f"{name}: a JSON list cannot be streamed (the whole list must be parsed at once); convert it to "
                'JSONL, one object per line (e.g. python -c "import json,sys; [print(json.dumps(r)) for r in '
                f'json.load(open(sys.argv[1]))]" {name} > {path.stem}.jsonl)'
            )
        if suffix in (".jsonl", ".json"):
            yield from _iter_json_lines(path, name, mapping, on_error)
        elif suffix == ".csv":
            yield from _iter_csv(path, name, mapping, on_error)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, name, mapping)
        elif suffix == ".txt":
            yield from _iter_prompt_file(path, name, on_error)
        else:
            load_rows(spec, columns=columns, split=split, keep_all=keep_all)  # raises: unsupported type
        return
    if _HUB_ID.match(name) and path.suffix.lower() not in _SUFFIXES:
        yield from _iter_hub(name, mapping, split)
        return
    load_rows(spec, columns=columns, split=split, keep_all=keep_all)  # raises: not found


def _report(error: DataError, on_error: OnError | None) -> None:
    if on_error is None:
        raise error
    on_error(str(error))


def _starts_with_list(path: Path) -> bool:
    """Whether the file's first character that is not white space (or a byte-order mark) is '['."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            text = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if text:
                return text[:1] == b"["
    return False


def _decoded_lines(path: Path, name: str, on_error: OnError | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line (split on "\\n" only, the newline kept), decoded as UTF-8 (a
    leading byte-order mark dropped); a line that is not UTF-8 is :func:`read_text`'s error, or, with
    ``on_error``, reported and decoded with replacement characters."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                _report(
                    DataError(
                        f"{name} line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); save the file as UTF-8"
                    ),
                    on_error,
                )
                yield number, raw.decode("utf-8", errors="replace")


def _column_mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"data.columns: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    for field, column in columns.items():
        if not isinstance(column, str) or not column:
            raise DataError(
                f"data.columns.{field}: the column name must be a non-empty string, got {column!r}"
            )
    return {field: columns.get(field, field) for field in FIELDS}


def _project(raw: Mapping[str, Any], mapping: dict[str, str], source: str) -> dict:
    """Rename the source's columns to our fields, keep only those (or, with ``KEEP_ALL`` in the mapping,
    every column); ``None`` counts as absent."""
    fields = {field: column for field, column in mapping.items() if field != KEEP_ALL}
    row = {field: raw[column] for field, column in fields.items() if raw.get(column) is not None}
    if KEEP_ALL in mapping:
        renamed = set(fields.values())
        row.update({k: v for k, v in raw.items() if k not in renamed and k not in row and v is not None})
    row["_source"] = source
    return row


def prompt_lines(text: str, name: str) -> list[dict]:
    """Rows ``{"prompt", "_source"}`` of a text with one prompt per line; blank lines and lines starting
    with '#' are skipped (but counted)."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append({"prompt": line, "_source": f"{name} line {number}"})
    return rows


def builtin_names() -> list[str]:
    folder = resources.files("preftune.data").joinpath("builtin")
    return sorted(p.name.removesuffix(".txt") for p in folder.iterdir() if p.name.endswith(".txt"))


def _load_builtin(name: str) -> list[dict]:
    which = name[len(BUILTIN) :]
    if which not in builtin_names():
        raise DataError(f"{name}: no such built-in prompt list; the built-in ones are {builtin_names()}")
    text = resources.files("preftune.data").joinpath("builtin").joinpath(f"{which}.txt").read_text("utf-8")
    return prompt_lines(text, name)


def _check_columns(present: list[str], mapping: dict[str, str], name: str) -> None:
    """A column the user renamed explicitly must exist in a tabular source."""
    for field, column in mapping.items():
        if field != KEEP_ALL and column != field and column not in present:
            raise DataError(
                f"{name}: column {column!r} (mapped to field {field!r}) not found; the columns are {present}"
            )


def read_text(path: str | os.PathLike, name: str | None = None) -> str:
    """A text file's contents as UTF-8 (a leading byte-order mark is dropped); bytes that are not UTF-8
    raise :class:`DataError` naming the file, the line and the column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{name or path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _load_json_lines(path: Path, name: str, mapping: dict[str, str]) -> list[dict]:
    read_text(path, name)  # a file that is not UTF-8 is refused before any record is read
    return list(_iter_json_lines(path, name, mapping))


def _iter_json_lines(
    path: Path, name: str, mapping: dict[str, str], on_error: OnError | None = None
) -> Iterator[dict]:
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 and the like
    for number, line in _decoded_lines(path, name, on_error):
        if not line.strip():
            continue
        source = f"{name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _report(DataError(f"{source}: malformed JSON: {e.msg} (column {e.colno})"), on_error)
            continue
        if not isinstance(record, dict):
            _report(DataError(f"{source}: expected a JSON object, got {type(record).__name__}"), on_error)
            continue
        yield _project(record, mapping, source)


def _load_json(path: Path, name: str, mapping: dict[str, str]) -> list[dict]:
    """A ``.json`` file holds either one list of objects or JSON Lines."""
    text = read_text(path, name)
    if not text.lstrip().startswith("["):
        return _load_json_lines(path, name, mapping)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    rows = []
    for number, record in enumerate(records):
        source = f"{name} record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        rows.append(_project(record, mapping, source))
    return rows


def _load_csv(path: Path, name: str, mapping: dict[str, str]) -> list[dict]:
    read_text(path, name)  # a file that is not UTF-8 is refused before any record is read
    return list(_iter_csv(path, name, mapping))


def _iter_csv(
    path: Path, name: str, mapping: dict[str, str], on_error: OnError | None = None
) -> Iterator[dict]:
    reader = csv.reader(line for _, line in _decoded_lines(path, name, on_error))
    header = next(reader, None)
    if header is None:
        return
    _check_columns(header, mapping, name)
    while True:
        number = reader.line_num + 1  # the physical line this record starts on
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            _report(DataError(f"{name} line {number}: malformed CSV: {e}"), on_error)
            continue
        if not cells:
            continue  # blank line
        try:
            row = _csv_row(header, cells, mapping, f"{name} line {number}")
        except DataError as e:
            _report(e, on_error)
            continue
        yield row


def _csv_row(header: list[str], cells: list[str], mapping: dict[str, str], source: str) -> dict:
    if len(cells) != len(header):
        raise DataError(f"{source}: expected {len(header)} cells (the header's), got {len(cells)}")
    raw = {column: cell for column, cell in zip(header, cells) if cell != ""}
    row = _project(raw, mapping, source)
    if isinstance(row.get("label"), str) and row["label"].strip().lower() in ("true", "false"):
        row["label"] = row["label"].strip().lower() == "true"  # unpaired data's label cell
    for field in NUMBER_FIELDS:
        if field in row:
            try:
                row[field] = float(row[field])
            except ValueError:
                raise DataError(f"{source}: field {field!r}: not a number: {row[field]!r}") from None
    return row


def _load_parquet(path: Path, name: str, mapping: dict[str, str]) -> list[dict]:
    return list(_iter_parquet(path, name, mapping))


def _load_saved_dataset(path: Path, name: str, mapping: dict[str, str], split: str) -> list[dict]:
    return list(_iter_saved_dataset(path, name, mapping, split))


def _load_hub(name: str, mapping: dict[str, str], split: str) -> list[dict]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth and missing-dataset errors all land here
        raise DataError(
            f"{name}: not a local path, and loading it as a hub dataset (split {split!r}) failed; "
            f"hub datasets need network access. Cause: {type(e).__name__}: {e}"
        ) from e
    _check_columns(data.column_names, mapping, name)
    return [_project(r, mapping, f"{name} [{split}] record {i}") for i, r in enumerate(data.to_list())]


def _iter_parquet(path: Path, name: str, mapping: dict[str, str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for bad files
        raise DataError(f"{name}: cannot read parquet: {e}") from e
    _check_columns(parquet.schema_arrow.names, mapping, name)
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _project(record, mapping, f"{name} record {number}")
            number += 1


def _iter_saved_dataset(path: Path, name: str, mapping: dict[str, str], split: str) -> Iterator[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))  # memory-mapped Arrow files: nothing is read yet
    except FileNotFoundError as e:
        raise DataError(f"{name}: not a folder written by datasets' save_to_disk ({e})") from e
    where = name
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{name}: no split {split!r}; the splits are {list(data)}")
        data, where = data[split], f"{name} [{split}]"
    _check_columns(data.column_names, mapping, name)
    yield from _project_batches(data.iter(batch_size=1024), mapping, f"{where} record")


def _iter_hub(name: str, mapping: dict[str, str], split: str) -> Iterator[dict]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split, streaming=True)  # an IterableDataset
    except Exception as e:  # network, auth and missing-dataset errors all land here
        raise DataError(
            f"{name}: not a local path, and streaming it as a hub dataset (split {split!r}) failed; "
            f"hub datasets need network access. Cause: {type(e).__name__}: {e}"
        ) from e
    if data.column_names is not None:
        _check_columns(data.column_names, mapping, name)
    for number, record in enumerate(data):
        if number == 0 and data.column_names is None:
            _check_columns(list(record), mapping, name)
        yield _project(record, mapping, f"{name} [{split}] record {number}")


def _project_batches(batches: Iterable[dict], mapping: dict[str, str], where: str) -> Iterator[dict]:
    """Rows of column batches (``{column: [values]}``), numbered from 0 as ``"<where> N"``."""
    number = 0
    for batch in batches:
        for values in zip(*batch.values()):
            yield _project(dict(zip(batch, values)), mapping, f"{where} {number}")
            number += 1


def _iter_prompt_file(path: Path, name: str, on_error: OnError | None) -> Iterator[dict]:
    """:func:`prompt_lines` of a ``.txt`` file, a line at a time."""
    for number, line in _decoded_lines(path, name, on_error):
        line = line.strip()
        if line and not line.startswith("#"):
            yield {"prompt": line, "_source": f"{name} line {number}"}
