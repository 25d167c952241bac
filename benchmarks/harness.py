"""What the side-by-side benchmarks share: each system runs in its own process (its own venv if need be), the
same threads, and reports one JSON line with its peak RSS."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

PREFIX = "RESULT "


def report_child(run: Callable[[Path], dict], threads: int) -> None:
    """In the child: ``run(tmp_dir)`` with ``threads`` torch threads, then its result and peak RSS as one line."""
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(PREFIX + json.dumps(result))


def huge_pages(system: str, trl_too: bool = False) -> dict[str, str]:
    """The environment that gives each system its own default allocator: preftune's CLI and ``import preftune``
    (before torch) turn on torch's transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``); TRL runs with torch's
    default (off) unless ``trl_too``. Set here because a benchmark child imports torch before preftune."""
    return {"THP_MEM_ALLOC_ENABLE": "1" if system == "preftune" or trl_too else "0"}


def run_child(python: str, args: list[str], threads: int, what: str, env: dict | None = None) -> dict:
    """In the parent: ``python args...`` in a fresh process with ``threads`` threads (and ``env`` added to the
    environment); its reported result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run([python, *args], env=env, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith(PREFIX)]
    if done.returncode != 0 or not line:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[-1][len(PREFIX) :])
