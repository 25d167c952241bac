"""Streamed data (``data.streaming: true``) on a large generated file: time to the first optimizer step and
peak RSS, against the same run on a 64-pair file (CPU, embedded SmolLM2-135M-Instruct, DPO, batch 4, one
step; the reference runs on the fly, as streaming requires).

    python benchmarks/bench_streaming.py                   # a 2 GB JSONL (written to --dir, then deleted)
    python benchmarks/bench_streaming.py --size-gb 0.2 --keep
    python benchmarks/bench_streaming.py --size-gb 0.02 --systems streamed cached trl

``--systems``: ``streamed`` (``data.streaming: true``, the default), ``cached`` (not streamed: every record read,
checked and tokenised up front into the token cache, then a second run that maps the cache), ``trl`` (TRL's
DPOTrainer on the same JSONL through ``datasets``, which also tokenises every record before step 1; a fresh
datasets cache, the reference on the fly as well).

Goal (issue 15): the first step within 60 s, peak RSS at most the 64-pair run's + 0.5 GB. Each run is its own
process (benchmarks/harness.py); "first step" is from the process start (imports, model load included) to the
end of optimizer step 1, as ``on_step_end`` sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import huge_pages, report_child, run_child  # noqa: E402

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


def child(mode: str, data: str, started: float) -> None:
    """One DPO step on ``data`` (``mode``: streamed, cached or trl), reported with the time to the end of
    step 1."""

    def run(tmp: Path) -> dict:
        if mode == "trl":
            return run_trl(data, tmp, started)
        from preftune.config import train_config_from_dict
        from preftune.training import train

        streamed = mode == "streamed"
        cfg = train_config_from_dict(
            {
                "method": "dpo",
                "data": {"train": data, "streaming": streamed, "max_length": 128, "max_prompt_length": 64,
                         **({} if streamed else {"eval_fraction": 0.0})},
                "training": {
                    "output_dir": str(tmp / "run"), "batch_size": 4, "max_steps": 1, "progress": False,
                    "learning_rate": 1e-6, "precompute_ref": False,
                },
            }
        )  # fmt: skip
        first: list[float] = []
        train(cfg, on_step_end=lambda step, row: first.append(time.time() - started), log=lambda *a: None)
        return {"first_step_s": first[0], "total_s": time.time() - started}

    report_child(run, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))


def run_trl(data: str, tmp: Path, started: float) -> dict:
    """TRL's DPOTrainer, one step of 4 pairs from the JSONL, the settings of the preftune run."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preftune.models import embedded_model_dir

    model_dir = str(embedded_model_dir())
    first: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            first.append(time.time() - started)

    args = DPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        optim="adamw_torch_fused", per_device_train_batch_size=4, max_steps=1,
        learning_rate=1e-6, beta=0.1, max_length=128, save_strategy="no", report_to="none",
        dataloader_num_workers=0, logging_steps=1,
    )  # fmt: skip
    cache = str(Path(data).parent / "datasets-cache")  # under --dir; main() empties it before and after
    train_set = load_dataset("json", data_files=data, split="train", cache_dir=cache)
    trainer = DPOTrainer(
        model=model_dir, args=args, train_dataset=train_set, callbacks=[Stamp()],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )  # fmt: skip
    trainer.train()
    return {"first_step_s": first[0], "total_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="where the generated files and the runs' caches go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=["streamed"], choices=["streamed", "cached", "trl"])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "STARTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], float(args.child[2]))
    folder = Path(args.dir) / "preftune-bench-streaming"
    folder.mkdir(parents=True, exist_ok=True)
    small, large = folder / "pairs-64.jsonl", folder / f"pairs-{args.size_gb:g}gb.jsonl"
    write_pairs(small, count=64)
    began = time.time()
    n = write_pairs(large, size_bytes=args.size_gb * GB)
    print(f"wrote {large}: {large.stat().st_size / GB:.2f} GB, {n} pairs in {time.time() - began:.0f}s")
    caches = [folder / "token-cache", folder / "datasets-cache"]  # preftune's and TRL's, fresh for this run
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    env = {"PREFTUNE_TOKEN_CACHE": str(caches[0])}
    try:
        results = {}
        runs = [("streamed", "64 pairs", small)]
        for system in args.systems:
            big = f"{args.size_gb:g} GB"
            if system == "cached":
                runs += [
                    ("cached", f"{big} cached, 1st run", large),
                    ("cached", f"{big} cached, 2nd run", large),
                ]
            else:
                runs.append((system, f"{big} {system}", large))
        for mode, name, path in runs:
            argv = [__file__, "--child", mode, str(path), "0"]
            argv[-1] = repr(time.time())  # the child's clock starts at its launch
            system = "trl" if mode == "trl" else "preftune"
            results[name] = r = run_child(
                sys.executable, argv, args.threads, name, {**env, **huge_pages(system)}
            )
            print(
                f"{name:>26}: first step {r['first_step_s']:7.1f} s   peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB",
                flush=True,
            )
        if "streamed" in args.systems:
            base, big = results["64 pairs"], results[f"{args.size_gb:g} GB streamed"]
            extra = (big["peak_rss_mb"] - base["peak_rss_mb"]) / 1024
            print(
                f"streamed {args.size_gb:g} GB: first step {big['first_step_s']:.1f} s (goal <= 60), peak RSS "
                f"{extra:+.2f} GB against 64 pairs (goal <= +0.5)"
            )
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
        if not args.keep:
            large.unlink(missing_ok=True)
            small.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
