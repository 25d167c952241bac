"""The tokenised examples of a data file, kept on disk and memory-mapped (``data.token_cache``, on by default).

Reading, checking and tokenising a large preference file takes minutes (200k pairs: see docs/data.md); its
result depends only on what :func:`cache_key` hashes, so a second run of a config (or ``preftune validate``
then ``preftune train``) maps the first run's result instead:

- the data: every data file's content (BLAKE2b of the whole file; above :data:`WHOLE_BELOW` bytes its size,
  mtime and :data:`SAMPLES` blocks spread over it), a ``save_to_disk`` folder's files the same way; a hub id
  is not cached (its content is not known without downloading it);
- the tokenizer: its class, its whole serialised form (vocabulary, merges, normaliser, pre- and
  post-processor), its special tokens and its chat template;
- the settings that shape the examples or decide which records are refused: ``data.columns``, ``split`` /
  ``eval_split``, ``eval`` / ``eval_fraction`` (and the seed that splits), ``max_length``,
  ``max_prompt_length``, whether scores / margins are required;
- the code that turns rows into examples (the source of ``data/load.py``, ``checks.py``, ``tokenize.py``,
  ``unpaired.py`` and this module), so an edited check or tokenisation never reads a stale entry.

An entry is a folder ``$PREFTUNE_CACHE/tokens/<key>/`` (``$PREFTUNE_TOKEN_CACHE`` to move it): per split a
flat int32 array of every example's token ids (``<split>.tokens.npy``) and int64 offsets into it
(``<split>.offsets.npy``, (n·f + 1,) for f token fields per example: prompt, chosen, rejected, or prompt,
completion), opened with ``mmap_mode="r"``, plus ``meta.json``: the per-example fields that are not tokens
(source, scores, margin, label, truncated), the :class:`~preftune.data.TokenizeStats` of each split and the
log lines the first run printed while reading. It is written to a temporary folder and renamed into place,
so an entry is whole or absent; one that does not load (a missing or truncated file, offsets that do not
fit the tokens) is ignored and rewritten. On a hit the examples are a lazy :class:`CachedExamples`
sequence: example i is built from the map when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .tokenize import TokenizeStats
from .types import PairExample
from .unpaired import UnpairedExample

FORMAT = 1
WHOLE_BELOW = 1 << 30  # data files up to 1 GiB are hashed whole (about 1 s a GB); larger ones are sampled
SAMPLES, SAMPLE_BYTES = 256, 1 << 16  # blocks of a large file hashed beside its size and mtime
FIELDS = {
    "pair": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids"),
}


def cache_root() -> Path:
    from ..models import cache_dir

    root = os.environ.get("PREFTUNE_TOKEN_CACHE")
    return Path(root) if root else cache_dir() / "tokens"


def content_digest(path: str | Path) -> str | None:
    """A file's content digest (whole up to :data:`WHOLE_BELOW` bytes, else size + mtime + sampled blocks), or
    of every file of a folder (``save_to_disk``); None for what is not a local file or folder (a hub id)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        parts = [f"{p.relative_to(path)}:{content_digest(p)}" for p in files]
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=20).hexdigest()
    if not path.is_file():
        return None
    stat = path.stat()
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        if stat.st_size <= WHOLE_BELOW:
            while block := f.read(1 << 22):
                h.update(block)
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            for k in range(SAMPLES):
                f.seek(k * (stat.st_size - SAMPLE_BYTES) // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Everything about ``tokenizer`` that decides token ids: its class, its serialised form (a fast
    tokenizer's JSON; else its vocabulary), its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    described = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h = hashlib.blake2b(body.encode(), digest_size=20)
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.blake2b(digest_size=20)
    for name in ("load.py", "checks.py", "tokenize.py", "unpaired.py", "token_cache.py", "types.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(sources: dict[str, str | None], tokenizer, settings: dict) -> str | None:
    """The entry's name: a hash of the data sources' content, the tokenizer, ``settings`` (JSON-able) and the
    tokenising code; None when a source cannot be hashed (a hub id)."""
    data = {}
    for name, source in sources.items():
        if source is None:
            continue
        digest = content_digest(source)
        if digest is None:
            return None
        data[name] = digest
    key = {
        "format": FORMAT,
        "data": data,
        "tokenizer": tokenizer_digest(tokenizer),
        "settings": settings,
        "code": _code_digest(),
    }
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()


class CachedExamples(Sequence):
    """A split's examples on the memory map: ``len`` and ``[i]`` as the list they were written from (example i
    is built when read; a slice gives a list)."""

    def __init__(self, kind: str, tokens: np.ndarray, offsets: np.ndarray, records: dict[str, list]):
        # plain arrays over the map (np.memmap's own indexing is ~5x slower); offsets as Python ints
        self.kind, self.tokens, self.records = kind, tokens.view(np.ndarray), records
        self.offsets = offsets.tolist()
        self.fields = len(FIELDS[kind])

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.fields

    def _ids(self, k: int) -> tuple[int, ...]:
        return tuple(self.tokens[self.offsets[k] : self.offsets[k + 1]].tolist())

    def max_token(self) -> int:
        """The largest token id of any example (-1 with none): the vocabulary check without building them."""
        return int(self.tokens.max()) if len(self.tokens) else -1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        i %= n
        f, r = self.fields, self.records
        ids = [self._ids(i * f + k) for k in range(f)]
        if self.kind == "pair":
            return PairExample(
                i, *ids, score_chosen=r["score_chosen"][i], score_rejected=r["score_rejected"][i],
                margin=r["margin"][i], source=r["source"][i], truncated=r["truncated"][i],
            )  # fmt: skip
        return UnpairedExample(i, *ids, r["label"][i], r["source"][i], r["truncated"][i])

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Sequence)
            and len(self) == len(other)
            and all(a == b for a, b in zip(self, other))
        )


def _kind(examples: Sequence) -> str:
    return "unpaired" if examples and isinstance(examples[0], UnpairedExample) else "pair"


def save(
    key: str, examples: dict[str, Sequence], stats: dict[str, TokenizeStats], logged: Sequence[str] = ()
) -> Path:
    """Write the entry ``key`` (every split's examples and stats, and the lines logged while reading them)
    atomically; returns its folder."""
    from ..files import atomic_dir

    final = cache_root() / key
    meta: dict = {"format": FORMAT, "logged": list(logged), "splits": {}}
    with atomic_dir(final, tmp_name=f".{key}.{os.getpid()}.tmp") as tmp:
        for split, split_examples in examples.items():
            kind = _kind(split_examples)
            names = FIELDS[kind]
            lengths = [len(getattr(e, name)) for e in split_examples for name in names]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            tokens = np.fromiter(
                (t for e in split_examples for name in names for t in getattr(e, name)),
                dtype=np.int32,
                count=int(offsets[-1]),
            )
            np.save(tmp / f"{split}.tokens.npy", tokens)
            np.save(tmp / f"{split}.offsets.npy", offsets)
            extra = ("score_chosen", "score_rejected", "margin") if kind == "pair" else ("label",)
            records = {
                name: [getattr(e, name) for e in split_examples] for name in ("source", "truncated", *extra)
            }
            meta["splits"][split] = {
                "kind": kind, "count": len(split_examples), "tokens": int(offsets[-1]),
                "stats": vars(stats[split]), "records": records,
            }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta))
    return final


def load(key: str) -> tuple[dict[str, CachedExamples], dict[str, TokenizeStats], list[str]] | None:
    """The entry ``key`` as (examples, stats, logged lines), or None when it is absent or does not load whole
    (missing or truncated files, counts or offsets that disagree)."""
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        examples, stats = {}, {}
        for split, m in meta["splits"].items():
            tokens = np.load(folder / f"{split}.tokens.npy", mmap_mode="r")
            offsets = np.load(folder / f"{split}.offsets.npy", mmap_mode="r")
            fields = len(FIELDS[m["kind"]])
            ok = (
                tokens.dtype == np.int32 and tokens.shape == (m["tokens"],)
                and offsets.shape == (m["count"] * fields + 1,)
                and offsets[0] == 0 and offsets[-1] == m["tokens"]
                and all(len(v) == m["count"] for v in m["records"].values())
            )  # fmt: skip
            if not ok or (m["count"] and bool((np.diff(offsets) < 0).any())):
                return None
            examples[split] = CachedExamples(m["kind"], tokens, offsets, m["records"])
            stats[split] = TokenizeStats(**m["stats"])
        return examples, stats, list(meta.get("logged", []))
    except (OSError, ValueError, KeyError, TypeError):  # a partial or corrupt entry: a miss, rewritten
        return None


def cached(
    key: str | None,
    build: Callable[[], tuple[dict[str, Sequence], dict[str, TokenizeStats], list[str]]],
    log=print,
) -> tuple[dict[str, Sequence], dict[str, TokenizeStats], list[str]]:
    """``build()``'s (examples, stats, logged lines), from the entry ``key`` when it loads, else built and
    written (``key`` None: built, nothing written). A failed write (disk full, read-only cache) is logged and
    the run goes on."""
    if key is not None:
        hit = load(key)
        if hit is not None:
            for line in hit[2]:  # what the first run printed while reading (a warning about the splits)
                log(line)
            return hit
    examples, stats, logged = build()
    if key is not None and load(key) is None:  # (another process of the run may have written it meanwhile)
        try:
            save(key, examples, stats, logged)
        except OSError as exc:
            log(
                f"warning: the tokenised data could not be cached in {cache_root()} ({exc}); the next run tokenises again"
            )
    return examples, stats, logged


__all__ = ["CachedExamples", "cache_key", "cache_root", "cached", "content_digest", "load", "save"]
