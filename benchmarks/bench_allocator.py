"""glibc's mmap threshold (``engine.limit_heap_growth``) against speed and peak memory: the same short training
run of the embedded SmolLM2-135M-Instruct under each threshold, each in a fresh process, the settings
interleaved round by round so that a machine whose load drifts treats them alike. Prints, per setting, the
median over rounds of wall seconds, CPU seconds (user + system), page faults and peak RSS.

A threshold of T bytes serves every allocation above T by its own mmap, returned to the system on free (no heap
fragmentation, but every such tensor's pages are faulted in and zeroed again each time); ``off`` leaves glibc's
dynamic threshold (it rises to 32 MiB after the first large free; larger blocks then come from a heap that
fragments and is never returned). A ``+thp`` suffix (``524288+thp``) runs with torch's transparent huge pages for
tensors of 2 MB and more (``THP_MEM_ALLOC_ENABLE=1``, what ``import preftune`` sets by default); without it, with
``THP_MEM_ALLOC_ENABLE=0``.

    python benchmarks/bench_allocator.py                                  # dpo and grpo, 3 rounds
    python benchmarks/bench_allocator.py --configs configs/dpo.yaml --thresholds 524288 off --rounds 2
    python benchmarks/bench_allocator.py --thresholds 524288 524288+thp off off+thp
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# the CLI in a child that reports its own peak RSS (KiB) on stderr as it exits
_CHILD = (
    "import atexit, resource, runpy, sys; "
    "atexit.register(lambda: print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
    "sys.argv = ['preftune', *sys.argv[1:]]; runpy.run_module('preftune.cli', run_name='__main__')"
)
RUNS = {  # config -> overrides: a few steps, no evaluation, nothing written but the run folder
    "configs/dpo.yaml": ["training.max_steps=6", "data.eval_fraction=0", "training.ref_cache=false"],
    "configs/grpo.yaml": ["training.max_steps=3", "data.eval_fraction=0"],
}


def one_run(config: str, threshold: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PREFTUNE_NO_MALLOPT", None)
    env.pop("PREFTUNE_MMAP_THRESHOLD", None)
    threshold, thp = threshold.removesuffix("+thp"), threshold.endswith("+thp")
    env["THP_MEM_ALLOC_ENABLE"] = "1" if thp else "0"
    if threshold == "off":
        env["PREFTUNE_NO_MALLOPT"] = "1"
    else:
        env["PREFTUNE_MMAP_THRESHOLD"] = threshold
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-c", _CHILD, "train", config, *RUNS[config]]
        args += [f"training.output_dir={tmp}/run", "training.progress=false"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{config} at {threshold} failed:\n{done.stderr[-3000:]}")
    return {
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "sys": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
        "peak_gb": int(done.stderr.rsplit("PEAK ", 1)[1].split()[0]) / 1024**2,  # this child's own peak
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(RUNS))
    ap.add_argument("--thresholds", nargs="+", default=["524288", "524288+thp", "33554432", "off", "off+thp"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"load at start: {os.getloadavg()[0]:.1f}; {args.rounds} rounds, {args.threads} threads\n")
    print("| config | mmap threshold | wall s | CPU s (sys) | page faults | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        results: dict[str, list[dict]] = {t: [] for t in args.thresholds}
        for _ in range(args.rounds):
            for t in args.thresholds:
                results[t].append(one_run(config, t, args.threads))
        for t in args.thresholds:
            r = results[t]

            def med(key, r=r):
                return statistics.median(x[key] for x in r)

            bare = t.removesuffix("+thp")
            label = (bare if bare == "off" else f"{int(bare) / 1024**2:g} MiB") + (
                ", huge pages" if bare != t else ""
            )
            print(
                f"| {os.path.basename(config)} | {label} | {med('wall'):.1f} | {med('cpu'):.1f} ({med('sys'):.1f}) "
                f"| {med('faults') / 1e6:.2f} M | {max(x['peak_gb'] for x in r):.2f} |"
            )
    print(f"\nload at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
