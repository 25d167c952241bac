"""The tied embedding's gradient added by index (training/embedding_grad.py) against PyTorch's dense
embedding backward, in one process: DPO steps of ``compare_trl.py``'s cases on the embedded model, the two
settings alternated run by run, median s/step of the steps after the first, and the final weights compared.

    python benchmarks/bench_embedding_grad.py --case short --steps 11 --runs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="short", choices=["short", "long", "conversational"])
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--runs", type=int, default=2, help="runs of each setting, alternated")
    args = p.parse_args()

    import torch
    from compare_trl import BETA, LR, THREADS, pairs
    from safetensors.torch import load_file

    import preftune
    import preftune.training.harness as harness
    from preftune.files import write_jsonl_atomic

    torch.set_num_threads(THREADS)
    index_grad = harness.use_index_grad_embedding
    times: dict[str, list[float]] = {"dense": [], "index": []}
    final: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        write_jsonl_atomic(data, pairs(args.case))
        for run in range(args.runs):
            for setting in ("dense", "index"):
                harness.use_index_grad_embedding = index_grad if setting == "index" else (lambda model: False)
                stamps: list[float] = []
                out = os.path.join(tmp, f"{setting}-{run}")
                cfg = {
                    "method": "dpo",
                    "data": {"train": data, "max_length": 1024, "max_prompt_length": 768},
                    "training": {"output_dir": out, "batch_size": 4, "max_steps": args.steps, "learning_rate": LR,
                                 "lr_scheduler": "constant", "progress": False, "ref_cache": False},
                    "dpo": {"beta": BETA},
                }  # fmt: skip
                stamps.append(time.perf_counter())
                preftune.train(
                    cfg,
                    on_step_end=lambda step, row, stamps=stamps: stamps.append(time.perf_counter()),
                    log=lambda *a: None,
                )
                steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # after step 1 (optimizer state)
                times[setting] += steps
                final[setting] = load_file(os.path.join(out, "model", "model.safetensors"))
                print(
                    f"run {run} {setting}: median {statistics.median(steps):.3f} s/step over {len(steps)} steps"
                )
    diff = max((final["dense"][k] - final["index"][k]).abs().max().item() for k in final["dense"])
    dense, index = statistics.median(times["dense"]), statistics.median(times["index"])
    print(f"case {args.case}: dense {dense:.3f} s/step, index {index:.3f} s/step, {dense / index:.2f}x; "
          f"final weights max |diff| {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
