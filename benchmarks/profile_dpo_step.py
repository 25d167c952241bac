"""Where a preftune DPO step spends its time: torch.profiler over steady-state steps of the cases of
``compare_trl.py`` (same data, model, batch and settings), printing the operators that hold the most self
CPU time and the share of matrix multiplication in the step.

    python benchmarks/profile_dpo_step.py --case short --steps 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="short", choices=["short", "long", "conversational"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import torch
    from compare_trl import BETA, LR, THREADS, pairs
    from torch.profiler import ProfilerActivity, profile

    import preftune
    from preftune.files import write_jsonl_atomic

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        write_jsonl_atomic(data, pairs(args.case))
        prof = profile(activities=[ProfilerActivity.CPU])
        steps = {"n": 0}

        def on_step(step, row):
            steps["n"] = step
            if step == 1:  # warm-up done: profile the next steps
                prof.__enter__()

        cfg = {
            "method": "dpo",
            "data": {"train": data, "max_length": 1024, "max_prompt_length": 768},
            "training": {"output_dir": os.path.join(tmp, "run"), "batch_size": 4, "max_steps": 1 + args.steps,
                         "learning_rate": LR, "lr_scheduler": "constant", "progress": False, "ref_cache": False},
            "dpo": {"beta": BETA},
        }  # fmt: skip
        preftune.train(cfg, on_step_end=on_step, log=lambda *a: None)
        prof.__exit__(None, None, None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    print(
        f"case {args.case}: {args.steps} steps profiled, {total / 1e6 / args.steps:.2f} s of self CPU time a step"
    )
    print(f"matrix multiplication (mm/addmm/bmm): {matmul / total:.0%} of it\n")
    print("| operator | self CPU s/step | share |")
    print("|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(
            f"| {e.key} | {e.self_cpu_time_total / 1e6 / args.steps:.3f} | {e.self_cpu_time_total / total:.1%} |"
        )


if __name__ == "__main__":
    main()
