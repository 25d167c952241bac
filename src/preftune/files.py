"""Atomic writes, the one owner: a file or folder that preftune writes exists whole (old or new) or not at all.

Files go to a temporary name beside the target, are flushed to disk, then ``os.replace``-d into place.
Folders (models, checkpoints, experiment stages) are written into a temporary folder beside the target and
swapped in with :func:`replace_dir`; the old folder is removed only once the new one is in place. A write
that fails (disk full, permission) removes its temporary file or folder and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def to_json(obj: Any) -> Any:
    """``json.dumps`` fallback: paths as strings, dataclasses as dicts, sets sorted."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialise object of type {type(obj).__name__}: {obj!r}")


# --- what identifies a file's content cheaply -------------------------------------------------------------

SMALL = 8 << 20  # files up to 8 MiB are hashed whole
EDGE = 1 << 20  # of a larger file, the first and last MiB are hashed, beside its size and mtime_ns


def file_fingerprint(path: str | Path) -> dict:
    path = Path(path)
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= SMALL:
            while block := f.read(EDGE):
                h.update(block)
            return {"sha256": h.hexdigest()}
        h.update(f.read(EDGE))
        f.seek(-EDGE, 2)
        h.update(f.read(EDGE))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges_sha256": h.hexdigest()}


def folder_fingerprint(path: str) -> dict | str:
    """Every (non-hidden) file of a model folder by content; a hub id is identified by its name."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-2:])
    )
    return {"path": str(folder), "files": {str(p.relative_to(folder)): file_fingerprint(p) for p in files}}


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Pretty JSON (key order kept); non-finite floats are rejected."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False, default=to_json)
    return write_text_atomic(path, text + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line; non-finite floats are rejected."""
    lines = [json.dumps(row, ensure_ascii=False, allow_nan=False, default=to_json) for row in rows]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def save_safetensors_atomic(path: str | Path, tensors: dict) -> Path:
    from safetensors.torch import save

    return write_bytes_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {lineno}: invalid JSON: {err}") from err
    return rows


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Swap the finished folder ``tmp`` into ``final``; an existing ``final`` is removed only after."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return final
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_dir(
    final: str | Path, *, tmp_name: str | None = None, keep_existing: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends normally it becomes ``final``.

    Any exception (including KeyboardInterrupt) removes the temporary folder and leaves ``final`` as it was.
    ``keep_existing``: if ``final`` appeared meanwhile (another process won the race), keep that one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / (tmp_name or f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    replace_dir(tmp, final)
