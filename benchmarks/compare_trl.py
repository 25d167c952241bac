"""DPO side by side: preftune against TRL's DPOTrainer on the same pairs, model and settings.

Each system runs in its own process on the embedded SmolLM2-135M-Instruct in fp32 with 2 threads: the same
4 pairs every step (one batch is the whole data, so both see the same pairs in every step whatever their
shuffling), β = 0.1, lr 1e-6 constant, fused AdamW, no gradient checkpointing, reference log-probs
precomputed. Three cases: short prompts (movie-review openings), long prompts (~300 tokens of review context
before the same openings), conversational (the chat template). It prints seconds per step (median of the
steps after the first), pairs/s, peak RSS, the final losses side by side (they must agree: same maths),
the machine's measured fp32 GEMM rate, and the share of it each step reaches on the FLOPs the step needs
(6 × non-embedding parameters × tokens through the model, with the prompt once per pair when it is shared,
plus the LM head on the response tokens).

TRL is an optional dependency (``pip install -e ".[bench]"``); its side may run in another virtual
environment: ``python benchmarks/compare_trl.py --trl-python /work/trl-venv/bin/python``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from harness import huge_pages, report_child, run_child

THREADS = 2
STEPS = 11  # the first allocates the optimizer state: 10 timed steps (--steps)
BETA, LR = 0.1, 1e-6

_CONTEXT = (
    "Earlier reviews of the festival programme, for context. "
    "The first screening was a slow, patient drama about a family farm, shot in long takes that some of the "
    "audience found hypnotic and others found tedious; the second was a loud caper with a good cast and a "
    "script that ran out of ideas by the second act. A documentary about glaciers drew the biggest applause "
    "of the week, and a restored silent comedy from the 1920s reminded everyone how much can be said without "
    "a word. The animated feature was colourful but forgettable, the horror film had two great scares and an "
    "hour of waiting, and the closing-night romance divided the critics sharply. "
)


def pairs(case: str) -> list[dict]:
    from preftune.data import load_rows

    if case == "conversational":
        rows = load_rows("configs/data/example_conversations.jsonl")[:4]
    else:
        rows = load_rows("configs/data/example_pairs.jsonl")[:4]
        if case == "long":
            for r in rows:
                r["prompt"] = _CONTEXT * 2 + r["prompt"]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def flops_per_step(case: str) -> tuple[float, int]:
    """(FLOPs the step needs with the prompt shared, tokens through the model) from preftune's tokenisation."""
    from preftune.data import tokenize_rows
    from preftune.models import embedded_model_dir, load_model, load_tokenizer

    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    model = load_model(path)
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed  # tied head: counted apart
    rows = [{**r, "_source": "x"} for r in pairs(case)]
    examples, _ = tokenize_rows(rows, tok, max_length=1024, max_prompt_length=768)
    tokens = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    responses = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return 6.0 * body * tokens + 6.0 * embed * responses, tokens


def run_preftune(case: str, out: str, steps: int = STEPS) -> dict:
    import preftune
    from preftune.files import write_jsonl_atomic

    data = os.path.join(out, "pairs.jsonl")
    write_jsonl_atomic(data, pairs(case))
    stamps: list[float] = []
    rows: list[dict] = []
    cfg = {
        "method": "dpo",
        "data": {"train": data, "max_length": 1024, "max_prompt_length": 768},
        "training": {"output_dir": os.path.join(out, "run"), "batch_size": 4, "max_steps": steps,
                     "learning_rate": LR, "lr_scheduler": "constant", "progress": False, "ref_cache": False},
        "dpo": {"beta": BETA},
    }  # fmt: skip

    def on_step(step, row):
        stamps.append(time.perf_counter())
        rows.append(row)

    preftune.train(cfg, on_step_end=on_step, log=lambda *a: None)
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"s_per_step": statistics.median(steady), "losses": [r["loss"] for r in rows]}


def run_trl(case: str, out: str, steps: int = STEPS) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preftune.models import embedded_model_dir

    model_dir = str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = DPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        optim="adamw_torch_fused", per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", beta=BETA, loss_type=["sigmoid"],
        max_length=1024, precompute_ref_log_probs=True, precompute_ref_batch_size=4, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model_dir, args=args, train_dataset=Dataset.from_list(pairs(case)), processing_class=tok,
        callbacks=[Stamp()],
    )  # fmt: skip
    trainer.train()
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"s_per_step": statistics.median(steady), "losses": losses}


def gemm_rate() -> float:
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048**3 / (time.perf_counter() - start)


def child(system: str, case: str, steps: int) -> None:
    run = run_trl if system == "trl" else run_preftune
    report_child(lambda tmp: run(case, str(tmp), steps), THREADS)


def measure(system: str, python: str, case: str, steps: int, trl_huge_pages: bool = False) -> dict:
    args = [__file__, "--child", system, "--case", case, "--steps", str(steps)]
    return run_child(python, args, THREADS, f"{system} {case}", huge_pages(system, trl_huge_pages))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["short", "long", "conversational"])
    p.add_argument(
        "--steps", type=int, default=STEPS, help="optimizer steps per run (the first is not timed)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each system per case, alternated")
    p.add_argument("--trl-python", default=sys.executable)
    p.add_argument(
        "--trl-huge-pages",
        action="store_true",
        help="give TRL's process torch's transparent huge pages too (preftune turns them on; torch's default: off)",
    )
    p.add_argument("--child", choices=["trl", "preftune"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.case, args.steps)
        return
    rate = gemm_rate()
    print(
        f"fp32 GEMM rate (2048², {THREADS} threads): {rate / 1e9:.0f} GFLOP/s; {args.steps} steps of 4 pairs, "
        f"median after the first; {args.repeats} runs of each system, alternated\n"
    )
    print("| case | tokens/step | system | s/step | pairs/s | peak RSS MB | GEMM share | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    spreads = []
    for case in args.cases:
        flops, tokens = flops_per_step(case)
        runs = {"trl": [], "preftune": []}
        for _ in range(args.repeats):
            runs["trl"].append(measure("trl", args.trl_python, case, args.steps, args.trl_huge_pages))
            runs["preftune"].append(measure("preftune", sys.executable, case, args.steps))
        summary = {}
        for system, results in runs.items():  # the run of median s/step; RSS its maximum over the runs
            median = sorted(results, key=lambda r: r["s_per_step"])[len(results) // 2]
            summary[system] = {**median, "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
        trl, ours = summary["trl"], summary["preftune"]
        for name, r in (("TRL DPOTrainer", trl), ("preftune", ours)):
            print(
                f"| {case} | {tokens} | {name} | {r['s_per_step']:.2f} | {4 / r['s_per_step']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {flops / r['s_per_step'] / rate:.0%} | {r['losses'][-1]:.6f} |"
            )
        print(
            f"| {case} | | **preftune / TRL** | **{trl['s_per_step'] / ours['s_per_step']:.2f}x faster** | | "
            f"**{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x** | | Δ {abs(trl['losses'][-1] - ours['losses'][-1]):.1e} |"
        )
        ratios = [t["s_per_step"] / o["s_per_step"] for t, o in zip(runs["trl"], runs["preftune"])]
        rss = [o["peak_rss_mb"] / t["peak_rss_mb"] for t, o in zip(runs["trl"], runs["preftune"])]
        times = {k: ", ".join(f"{r['s_per_step']:.2f}" for r in v) for k, v in runs.items()}
        spreads.append(
            f"{case}: speed-up per run " + ", ".join(f"{r:.2f}x" for r in ratios)
            + f" (TRL s/step {times['trl']}; preftune {times['preftune']}); RSS ratio "
            + ", ".join(f"{r:.2f}x" for r in rss)
        )  # fmt: skip
    print()
    for line in spreads:
        print(line)


if __name__ == "__main__":
    main()
