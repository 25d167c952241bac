"""GRPO side by side: preftune against TRL's GRPOTrainer on the same model, prompts and settings.

Each system runs in its own process (so peak RSS is its own), on the embedded SmolLM2-135M-Instruct in fp32,
with the same prompts (the built-in movie-review openings), group size, prompts per step, completion length,
β, learning rate, clip range, token-mean loss, group-scaled advantages, fused AdamW and no gradient
checkpointing, 2 threads. It prints seconds per optimizer step (the median over the steps after the first,
which allocates the optimizer state), completions/s, peak RSS, and the split between generation and training.

TRL is an optional dependency (``pip install -e ".[bench]"``, never needed at run time); its side may run in
another virtual environment with ``--trl-python PATH/bin/python`` (preftune must be importable there too).

    python benchmarks/compare_trl_grpo.py                    # beta 0 and beta 0.04, 5 steps each
    python benchmarks/compare_trl_grpo.py --steps 8 --betas 0.04 --trl-python /work/trl-venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from harness import huge_pages, report_child, run_child

SETTINGS = {
    "group_size": 8,
    "prompts_per_step": 4,
    "max_new_tokens": 24,
    "micro_batch": 16,  # completions per forward/backward
    "learning_rate": 2e-5,
    "epsilon": 0.2,
    "threads": 2,
}


def _prompts(n: int) -> list[str]:
    from preftune.data import load_rows

    return [row["prompt"] for row in load_rows("builtin:movie_reviews_train")[:n]]


def _vader(prompts, completions, **kwargs):
    from preftune.rewards import vader_reward

    return vader_reward(prompts, completions)


def run_preftune(steps: int, beta: float, out: Path) -> dict:
    import preftune

    s = SETTINGS
    stamps: list[float] = []
    rows: list[dict] = []
    cfg = {
        "method": "grpo",
        "data": {"train": "builtin:movie_reviews_train", "max_prompt_length": 48, "max_length": 96},
        "generation": {"max_new_tokens": s["max_new_tokens"], "batch_size": 64},
        "training": {
            "output_dir": str(out / "preftune"),
            "max_steps": steps,
            "batch_size": s["micro_batch"],
            "learning_rate": s["learning_rate"],
            "lr_scheduler": "constant",
            "progress": False,
        },
        "grpo": {
            "completions_per_prompt": s["group_size"],
            "prompts_per_batch": s["prompts_per_step"],
            "beta": beta,
            "epsilon_low": s["epsilon"],
            "epsilon_high": s["epsilon"],
            "aggregation": "token_mean",
            "rewards": ["vader"],
            "log_completions_every": 0,
        },
    }

    def on_step(step, row):
        stamps.append(time.perf_counter())
        rows.append(row)

    started = time.perf_counter()
    preftune.train(cfg, on_step_end=on_step, overwrite=True, log=lambda *a: None)
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "s_per_step": statistics.median(steady),
        "generate_s": statistics.median(r["time/generate"] + r["time/old_ref_logps"] for r in rows[1:]),
        "train_s": statistics.median(r["time/train"] for r in rows[1:]),
        "reward": [round(r["reward"], 4) for r in rows],
        "total_s": time.perf_counter() - started,
    }


def run_trl(steps: int, beta: float, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from preftune.models import embedded_model_dir

    s = SETTINGS
    model_dir = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_dict({"prompt": _prompts(255)})
    per_step = s["group_size"] * s["prompts_per_step"]
    args = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        optim="adamw_torch_fused",  # TRL's default; preftune uses the fused AdamW too
        num_generations=s["group_size"],
        per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=per_step // s["micro_batch"],  # one generation round per optimizer step
        max_completion_length=s["max_new_tokens"],
        max_steps=steps,
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        beta=beta,
        epsilon=s["epsilon"],
        loss_type="dapo",
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )

    stamps: list[float] = []
    generate_s: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=_vader, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[Stamp()],
    )  # fmt: skip
    real = trainer._generate_and_score_completions

    def timed(*a, **k):
        t = time.perf_counter()
        result = real(*a, **k)
        generate_s.append(time.perf_counter() - t)
        return result

    trainer._generate_and_score_completions = timed
    started = time.perf_counter()
    trainer.train()
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    s_step = statistics.median(steady)
    gen = statistics.median(generate_s[1:])
    rewards = [round(h["reward"], 4) for h in trainer.state.log_history if "reward" in h]
    return {"s_per_step": s_step, "generate_s": gen, "train_s": s_step - gen, "reward": rewards,
            "total_s": time.perf_counter() - started}  # fmt: skip


def child(system: str, steps: int, beta: float) -> None:
    run = run_trl if system == "trl" else run_preftune
    report_child(lambda tmp: run(steps, beta, tmp), SETTINGS["threads"])


def measure(system: str, python: str, steps: int, beta: float, trl_huge_pages: bool = False) -> dict:
    args = [__file__, "--child", system, "--steps", str(steps), "--betas", str(beta)]
    return run_child(python, args, SETTINGS["threads"], system, huge_pages(system, trl_huge_pages))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    p.add_argument("--trl-python", default=sys.executable, help="a Python with trl (and preftune) installed")
    p.add_argument(
        "--trl-huge-pages",
        action="store_true",
        help="give TRL's process torch's transparent huge pages too (preftune turns them on; torch's default: off)",
    )
    p.add_argument("--child", choices=["trl", "preftune"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.betas[0])
        return
    s = SETTINGS
    print(
        f"GRPO on SmolLM2-135M-Instruct, fp32, {s['threads']} threads: {s['prompts_per_step']} prompts x "
        f"{s['group_size']} completions per step, <= {s['max_new_tokens']} new tokens, micro-batch "
        f"{s['micro_batch']}, {args.steps} steps (the first is left out of the timings)\n"
    )
    header = "| β | system | s/step | completions/s | generate (+ π_ref) s | train s | peak RSS MB |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for beta in args.betas:
        trl = measure("trl", args.trl_python, args.steps, beta, args.trl_huge_pages)
        ours = measure("preftune", sys.executable, args.steps, beta)
        per_step = s["prompts_per_step"] * s["group_size"]
        for name, r in (("TRL GRPOTrainer", trl), ("preftune", ours)):
            print(
                f"| {beta:g} | {name} | {r['s_per_step']:.2f} | {per_step / r['s_per_step']:.2f} | "
                f"{r['generate_s']:.2f} | {r['train_s']:.2f} | {r['peak_rss_mb']:.0f} |"
            )
        print(
            f"| {beta:g} | **preftune / TRL** | **{trl['s_per_step'] / ours['s_per_step']:.2f}x faster** | | "
            f"{trl['generate_s'] / max(ours['generate_s'], 1e-9):.2f}x | {trl['train_s'] / max(ours['train_s'], 1e-9):.2f}x | "
            f"**{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x** |"
        )
        print(f"<!-- β={beta:g} rewards per step: TRL {trl['reward']}, preftune {ours['reward']} -->")


if __name__ == "__main__":
    main()
