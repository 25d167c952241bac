"""Cached, resumable pipeline stages and atomic file writes.

A stage is a folder ``root/name`` produced by one function. Its ``stage.json`` records
the fingerprint of the stage's *inputs* (everything that determines its output: config
values, file hashes, and the fingerprints of the stages it reads from). Running a stage
whose folder holds a ``stage.json`` with the same fingerprint is skipped; anything else
reruns it from scratch.

The function writes into a temporary folder ``root/.name.tmp``; only after it returns
is ``stage.json`` written and the folder swapped into place (``os.replace``), so an
interrupted or failing run never leaves a half-written stage that looks finished.
Callers chain stages by putting the upstream ``stage.json`` fingerprint into the
downstream ``inputs``::

    gen_dir, _ = run_stage(root, "generate", {"model": m, "k": 8, "seed": 0}, generate)
    up = read_stage(root, "generate")["fingerprint"]
    run_stage(root, "score", {"reward": "vader", "upstream": up}, score)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import replace_dir, to_json, write_json_atomic

STAGE_FILE = "stage.json"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, NaN rejected."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=to_json
    )


def fingerprint(obj: Any) -> str:
    """First 16 hex characters of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


# ---- stages --------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name in ("..",):
        raise ValueError(f"invalid stage name {name!r}: must be a plain folder name not starting with '.'")


def read_stage(root: str | Path, name: str) -> dict:
    """The ``stage.json`` of a finished stage: fingerprint, inputs, summary, finished_at."""
    path = Path(root) / name / STAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"stage {name!r} has not finished: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cached_fingerprint(stage_dir: Path) -> str | None:
    try:
        with open(stage_dir / STAGE_FILE, encoding="utf-8") as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def run_stage(
    root: str | Path,
    name: str,
    inputs: dict,
    fn: Callable[[Path], dict | None],
    *,
    log: Callable[[str], Any] = print,
    resumable: bool = False,
) -> tuple[Path, bool]:
    """Run ``fn`` into ``root/name`` unless a finished run with the same inputs is there.

    Args:
        root: the experiment folder.
        name: the stage folder name.
        inputs: JSON-serialisable description of everything the output depends on
            (include upstream stages' fingerprints); its :func:`fingerprint` is the key.
        fn: ``fn(tmp_dir) -> summary | None`` writes the stage's files into ``tmp_dir``
            (an empty folder) and may return a JSON-serialisable dict of summary info.
        log: called with one line when the stage is skipped or run.

    Returns:
        ``(stage_dir, ran)``: ``ran`` is False when the cached result was reused.

    With ``resumable``, a Ctrl-C (KeyboardInterrupt) keeps the temporary folder, and the next run
    with the same inputs hands it back to ``fn`` as it was (``fn`` continues from what it finds
    there, e.g. a training checkpoint). Otherwise, and for any other exception, the folder goes.

    If ``fn`` raises, its temporary folder is deleted and the exception propagates; an
    existing ``root/name`` from earlier inputs is left untouched (its fingerprint no
    longer matches, so it will not be mistaken for the new result).
    """
    _check_name(name)
    root = Path(root)
    fp = fingerprint(inputs)
    stage_dir = root / name
    if _cached_fingerprint(stage_dir) == fp:
        log(f"[skip] {name} (cached)")
        return stage_dir, False

    tmp_dir = root / f".{name}.tmp"
    marker = tmp_dir / ".inputs-fingerprint"
    if resumable and marker.is_file() and marker.read_text() == fp:
        log(f"[resume] {name}")
    else:
        log(f"[run] {name}")
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        if resumable:
            marker.write_text(fp)
    try:
        summary = fn(tmp_dir)
        if summary is not None and not isinstance(summary, dict):
            raise TypeError(f"stage {name!r}: fn must return a dict or None, got {type(summary).__name__}")
        record = {
            "fingerprint": fp,
            "inputs": inputs,
            "summary": summary or {},
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp_dir / STAGE_FILE, record)
        marker.unlink(missing_ok=True)
    except KeyboardInterrupt:
        if not resumable:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    replace_dir(tmp_dir, stage_dir)
    return stage_dir, True
