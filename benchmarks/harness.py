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


def run_child(python: str, args: list[str], threads: int, what: str) -> dict:
    """In the parent: ``python args...`` in a fresh process with ``threads`` threads; its reported result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([python, *args], env=env, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith(PREFIX)]
    if done.returncode != 0 or not line:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[-1][len(PREFIX) :])
