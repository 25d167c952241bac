"""Streamed data (``data.streaming: true``) on a large generated file: time to the first optimizer step and
peak RSS, against the same run on a 64-pair file (CPU, embedded SmolLM2-135M-Instruct, DPO, batch 4, one
step; the reference runs on the fly, as streaming requires).

    python benchmarks/bench_streaming.py                   # a 2 GB JSONL (written to --dir, then deleted)
    python benchmarks/bench_streaming.py --size-gb 0.2 --keep

Goal (issue 15): the first step within 60 s, peak RSS at most the 64-pair run's + 0.5 GB. Each run is its own
process (benchmarks/harness.py); "first step" is from the process start (imports, model load included) to the
end of optimizer step 1, as ``on_step_end`` sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import report_child, run_child  # noqa: E402

GB = 1e9
GOOD = ["great and wonderful", "a wonderful story", "great music and a great ending", "I loved it"]
BAD = ["terrible and boring", "far too long", "a waste of time", "the plot made no sense"]


def write_pairs(path: Path, *, size_bytes: float = 0, count: int = 0) -> int:
    """Short valid pairs, one JSON object per line: ``count`` of them, or until the file holds ``size_bytes``;
    returns the count."""
    n, written = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while (count and n < count) or (not count and written < size_bytes):
            block = range(n, min(n + 10000, count) if count else n + 10000)
            chunk = "".join(
                json.dumps(
                    {
                        "prompt": f"Review {i}: the movie was",
                        "chosen": f" {GOOD[i % 4]}.",
                        "rejected": f" {BAD[(i * 3) % 4]}{'!' * (i % 3)}",
                    }
                )
                + "\n"
                for i in block
            )
            f.write(chunk)
            n, written = block.stop, written + len(chunk.encode("utf-8"))
    return n


def child(data: str, started: float) -> None:
    """One streamed DPO step on ``data``, reported with the time to the end of step 1."""

    def run(tmp: Path) -> dict:
        from preftune.config import train_config_from_dict
        from preftune.training import train

        cfg = train_config_from_dict(
            {
                "method": "dpo",
                "data": {"train": data, "streaming": True, "max_length": 128, "max_prompt_length": 64},
                "training": {
                    "output_dir": str(tmp / "run"), "batch_size": 4, "max_steps": 1, "progress": False,
                    "learning_rate": 1e-6,
                },
            }
        )  # fmt: skip
        first: list[float] = []
        train(cfg, on_step_end=lambda step, row: first.append(time.time() - started), log=lambda *a: None)
        return {"first_step_s": first[0], "total_s": time.time() - started}

    report_child(run, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the generated files go")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("DATA", "STARTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], float(args.child[1]))
    folder = Path(args.dir) / "preftune-bench-streaming"
    folder.mkdir(parents=True, exist_ok=True)
    small, large = folder / "pairs-64.jsonl", folder / f"pairs-{args.size_gb:g}gb.jsonl"
    write_pairs(small, count=64)
    began = time.time()
    n = write_pairs(large, size_bytes=args.size_gb * GB)
    print(f"wrote {large}: {large.stat().st_size / GB:.2f} GB, {n} pairs in {time.time() - began:.0f}s")
    try:
        results = {}
        for name, path in (("64 pairs", small), (f"{args.size_gb:g} GB", large)):
            argv = [__file__, "--child", str(path), "0"]
            argv[-1] = repr(time.time())  # the child's clock starts at its launch
            results[name] = run_child(sys.executable, argv, args.threads, name)
            r = results[name]
            print(
                f"{name:>10}: first step {r['first_step_s']:6.1f} s   peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB"
            )
        (base,), (big,) = [results["64 pairs"]], [results[f"{args.size_gb:g} GB"]]
        extra = (big["peak_rss_mb"] - base["peak_rss_mb"]) / 1024
        print(
            f"streamed {args.size_gb:g} GB: first step {big['first_step_s']:.1f} s (goal <= 60), peak RSS "
            f"{extra:+.2f} GB against 64 pairs (goal <= +0.5)"
        )
    finally:
        if not args.keep:
            large.unlink(missing_ok=True)
            small.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
