"""Sharded training against replicated: DPO and GRPO on the embedded model (configs/dpo.yaml, configs/grpo.yaml,
a few steps), 1 process vs 2 processes DDP (``training.sharding: none``) vs 2 processes FSDP2
(``training.sharding: fsdp``), CPU, gloo, one torch thread per process, the same global batch in all three.

Per configuration: seconds per optimizer step (median of the steps after the first), peak RSS of each
process (the largest is reported), and each process's share of the trained parameters, their gradients and the
AdamW moments (measured on the live tensors at the second step: DTensor shards count their local part).

    python benchmarks/bench_sharding.py                      # all six runs (about 10 minutes on 2 cores)
    python benchmarks/bench_sharding.py --methods dpo --steps 4
    python benchmarks/bench_sharding.py --methods dpo --runs "2 × DDP" "2 × FSDP"

Each run is ``torchrun --nproc_per_node N benchmarks/bench_sharding.py --child ...``: the child trains through
``preftune.training.train`` and prints one ``RESULT`` line per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "
RUNS = [
    ("1 process", 1, "none"),
    ("2 × DDP", 2, "none"),
    ("2 × FSDP", 2, "fsdp"),
    ("2 × FSDP, reshard_after_forward: false", 2, "fsdp-keep"),
]


def _overrides(method: str, nproc: int, sharding: str, steps: int, out: Path) -> list[str]:
    keep = ["training.reshard_after_forward=false"] if sharding == "fsdp-keep" else []
    common = [
        *keep,
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        f"training.sharding={sharding.removesuffix('-keep')}",
        "training.save_every=0",
        "training.progress=false",
        "training.log_every=1",
    ]
    if method == "dpo":  # global batch 2 pairs: 2 per step on 1 process, 1 on each of 2
        return [*common, f"training.batch_size={2 // nproc}", "data.eval_fraction=0.0"]
    # 4 prompts × 8 completions per step over all processes; no held-out sampling (it is not a training step)
    return [*common, "training.eval_every=0", "data.eval=null"]


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def child(method: str, sharding: str, steps: int, out: Path) -> None:
    """In each torchrun process: train, timing each step and measuring this process's state at step 2."""
    import torch

    from preftune.config import load_train_config
    from preftune.training import engine, train

    torch.set_num_threads(1)
    stamps: list[float] = []
    state: dict[str, int] = {}
    original = engine.Stepper.step

    def step(self, *args, **kwargs):
        if len(stamps) == 2 and not state:  # the optimizer state exists from step 1 on
            opt = getattr(self.optimizer, "optimizer", self.optimizer)
            state["params"] = _local_bytes(self.params)
            state["grads"] = _local_bytes(p.grad for p in self.params if p.grad is not None)
            state["optimizer"] = _local_bytes(
                v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
            )
        return original(self, *args, **kwargs)

    engine.Stepper.step = step
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_train_config(
        str(ROOT / "configs" / f"{method}.yaml"), _overrides(method, nproc, sharding, steps, out)
    )
    stamps.append(time.perf_counter())
    train(
        cfg,
        overwrite=True,
        on_step_end=lambda s, row: stamps.append(time.perf_counter()),
        log=lambda *a: None,
    )
    deltas = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # steps 2..N (step 1 allocates the moments)
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "s_per_step": statistics.median(deltas) if deltas else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"{k}_mb": v / 2**20 for k, v in state.items()},
    }
    print(PREFIX + json.dumps(result), flush=True)


def run(method: str, nproc: int, sharding: str, steps: int) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the child imports torch before preftune: give it the huge pages `import preftune` turns on (unless set)
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__]
        cmd += ["--child", method, sharding, str(steps), str(Path(tmp) / "run")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(x[len(PREFIX) :]) for x in done.stdout.splitlines() if x.startswith(PREFIX)]
    if done.returncode != 0 or len(rows) != nproc:
        raise RuntimeError(f"{method} {nproc} {sharding} failed:\n{done.stderr[-4000:]}")
    worst = max(rows, key=lambda r: r["peak_rss_mb"])
    share = sum(worst.get(f"{k}_mb", 0.0) for k in ("params", "grads", "optimizer"))
    return {
        "s_per_step": max(r["s_per_step"] for r in rows),
        "peak_rss_mb": worst["peak_rss_mb"],
        "state_mb": share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["dpo", "grpo"], choices=["dpo", "grpo"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--runs", nargs="+", default=[name for name, _, _ in RUNS], help="a subset of the rows"
    )
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "SHARDING", "STEPS", "OUT"))
    args = parser.parse_args()
    if args.child:
        method, sharding, steps, out = args.child
        return child(method, sharding, int(steps), Path(out))
    print(f"load before: {os.getloadavg()[0]:.2f}")
    print("| method | processes | s/step | peak RSS per process MB | params+grads+AdamW per process MB |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        results = {}
        for name, nproc, sharding in [r for r in RUNS if r[0] in args.runs]:
            r = results[name] = run(method, nproc, sharding, args.steps)
            print(
                f"| {method} | {name} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['state_mb']:.0f} |",
                flush=True,
            )
        if "2 × DDP" not in results or "2 × FSDP" not in results:
            continue
        ddp, fsdp = results["2 × DDP"], results["2 × FSDP"]
        print(
            f"| {method} | **FSDP / DDP** | **{fsdp['s_per_step'] / ddp['s_per_step']:.2f}×** | "
            f"**{fsdp['peak_rss_mb'] / ddp['peak_rss_mb']:.2f}×** | {fsdp['state_mb'] / ddp['state_mb']:.2f}× |",
            flush=True,
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
