"""The memory plan of ``preftune validate`` against the measured peak RSS of the same runs (CPU, embedded
SmolLM2-135M-Instruct, fp32). Each run trains a few steps in its own subprocess; its peak RSS is the child's
``ru_maxrss`` (``os.wait4``: the process and its waited-for descendants, so for a torchrun launch the largest
worker), and the plan is :func:`preftune.training.memory.plan_run` of the same config and process count.

    python benchmarks/bench_memory.py                      # dpo and grpo (about 8 minutes on 2 cores)
    python benchmarks/bench_memory.py --runs dpo dpo-2proc grpo-ckpt
    python benchmarks/bench_memory.py --activations        # the activation factor: RSS kept by a forward

Runs: ``dpo`` (configs/dpo.yaml, 4 steps), ``grpo`` (configs/grpo.yaml, 2 steps, evaluated after each: its
β = 0 evaluation KL loads a frozen copy of the starting model at the first evaluation after a step, so step 2
trains with it, as steps 11-30 of the full run do), ``dpo-2proc`` (2 processes under torchrun, gloo),
``dpo-fsdp`` (``dpo-2proc`` with ``training.sharding: fsdp``), ``grpo-ckpt`` (``grpo`` with gradient
checkpointing). Also measured: the baseline, a process that has
imported the training stack and loaded the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
RUNS = {
    "dpo": ("configs/dpo.yaml", ["training.max_steps=4"], 1),
    "grpo": ("configs/grpo.yaml", ["training.max_steps=2", "training.eval_every=1"], 1),
    "dpo-2proc": ("configs/dpo.yaml", ["training.max_steps=4"], 2),
    "dpo-fsdp": ("configs/dpo.yaml", ["training.max_steps=4", "training.sharding=fsdp"], 2),
    "grpo-ckpt": (
        "configs/grpo.yaml",
        ["training.max_steps=2", "training.eval_every=1", "training.gradient_checkpointing=true"],
        1,
    ),
}
BASELINE_CODE = (
    "import preftune.cli, preftune.training.run, accelerate, transformers, torch\n"
    "from preftune.models import embedded_model_dir, load_tokenizer\n"
    "load_tokenizer(str(embedded_model_dir()))\n"
)


def peak_rss(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """Run ``cmd``; its peak RSS in bytes (``ru_maxrss`` of the child and its descendants), seconds, output."""
    started = time.time()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    return usage.ru_maxrss * 1024, time.time() - started, text


def plan(config: str, overrides: list[str], processes: int):
    from transformers.utils import logging

    from preftune.config import load_train_config
    from preftune.training import validate
    from preftune.training.memory import MemoryPlan

    logging.disable_progress_bar()

    cfg = load_train_config(str(ROOT / config), overrides)
    summary = validate(cfg, num_processes=processes, log=lambda *a: None)
    return MemoryPlan.from_dict(summary["memory_plan"])


def measure_runs(names: list[str], threads: int) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads)}
    base, _, _ = peak_rss([sys.executable, "-c", BASELINE_CODE], env)
    print(f"baseline (imports + tokenizer): {base / GB:.2f} GB; threads per process {threads}; "
          f"load before: {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    rows = []
    for name in names:
        config, overrides, processes = RUNS[name]
        with tempfile.TemporaryDirectory() as tmp:
            args = [*overrides, f"training.output_dir={tmp}/run", "training.progress=false"]
            p = plan(config, args, processes)
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
            cmd = [
                *(launch if processes > 1 else [sys.executable]),
                "-m",
                "preftune.cli",
                "train",
                config,
                *args,
            ]
            measured, seconds, _ = peak_rss(cmd, env)
        rows.append((name, processes, p, measured, seconds))
        print(f"{name}: plan {p.total / GB:.2f} GB, measured {measured / GB:.2f} GB "
              f"({p.total / measured - 1:+.0%}) in {seconds:.0f} s", flush=True)  # fmt: skip
        print("\n".join("    " + line for line in p.lines()), flush=True)
    print("\n| run | processes | plan (GB) | measured peak RSS (GB) | plan / measured − 1 |")
    print("|---|---|---|---|---|")
    for name, processes, p, measured, _ in rows:
        print(
            f"| {name} | {processes} | {p.total / GB:.2f} | {measured / GB:.2f} | {p.total / measured - 1:+.1%} |"
        )
    print(f"\nload after: {os.getloadavg()[0]:.1f}")


ACTIVATION_POINTS = [  # (pairs, prompt tokens, tokens per response, gradient checkpointing)
    (1, 32, 32, False), (2, 32, 32, False), (4, 32, 32, False), (8, 32, 32, False),
    (2, 160, 16, False), (2, 32, 80, False), (4, 32, 32, True), (8, 32, 32, True),
]  # fmt: skip


def activation_point(pairs: int, prompt: int, response: int, checkpointing: bool) -> dict:
    """In this process: RSS kept by one DPO-shaped forward (shared prefix, with grad) of the embedded model."""
    import gc

    import psutil
    import torch

    from preftune.logprobs import shared_prefix_logps
    from preftune.models import embedded_model_dir, enable_gradient_checkpointing, load_model
    from preftune.training.engine import limit_heap_growth

    limit_heap_growth()
    model = load_model(str(embedded_model_dir()))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    prompts = [[5 + i] * prompt for i in range(pairs)]
    groups = [[[7] * response, [9] * response] for _ in range(pairs)]
    with torch.no_grad():  # kernels and allocator pools warmed once
        shared_prefix_logps(model, prompts[:1], [[[7] * 4, [9] * 4]], 2)
    gc.collect()
    before = psutil.Process().memory_info().rss
    flat, _, _ = shared_prefix_logps(model, prompts, groups, 2)
    gc.collect()
    kept = psutil.Process().memory_info().rss - before
    flat.sum().backward()
    return {"tokens": pairs * (prompt + 2 * response), "response_tokens": pairs * 2 * response, "kept": kept}


def measure_activations() -> None:
    from preftune.models import embedded_model_dir
    from preftune.training.memory import LOGITS_COPIES, ModelShape, activation_bytes, logits_bytes

    config = json.loads((embedded_model_dir() / "config.json").read_text())
    shape = ModelShape.from_config(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(
        "| tokens | response tokens | checkpointing | kept by the forward (MB) | planned (MB) | planned / kept − 1 |"
    )
    print("|---|---|---|---|---|---|")
    for pairs, prompt, response, ckpt in ACTIVATION_POINTS:
        cmd = [
            sys.executable,
            __file__,
            "--activation-point",
            str(pairs),
            str(prompt),
            str(response),
            str(int(ckpt)),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        r = json.loads(out.strip().splitlines()[-1])
        # after the forward: the activations and one copy of the logits (the log-softmax output); the
        # checkpointed layer's recomputation and the logits' gradient come in the backward
        planned = (
            activation_bytes(shape, r["tokens"], checkpointing=ckpt)
            + logits_bytes(shape, r["response_tokens"]) // LOGITS_COPIES
        )
        if ckpt:
            planned -= activation_bytes(shape, r["tokens"], checkpointing=False) // shape.layers
        print(f"| {r['tokens']} | {r['response_tokens']} | {'on' if ckpt else 'off'} | {r['kept'] / 1e6:.0f} | "
              f"{planned / 1e6:.0f} | {planned / r['kept'] - 1:+.0%} |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=["dpo", "grpo"])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training processes")
    ap.add_argument("--activations", action="store_true", help="measure the activations a forward keeps")
    ap.add_argument("--activation-point", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.activation_point:
        pairs, prompt, response, ckpt = args.activation_point
        print(json.dumps(activation_point(pairs, prompt, response, bool(ckpt))))
    elif args.activations:
        measure_activations()
    else:
        measure_runs(args.runs, args.threads)


if __name__ == "__main__":
    main()
