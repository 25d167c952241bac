"""The sampler against transformers' ``generate`` and against the machine's own dense throughput, in one process
on the embedded SmolLM2-135M-Instruct (fp32): for each (rows, new tokens) setting, tokens/s of preftune's
sampler (prefix shared, last-position head, finished rows dropped), of ``model.generate`` (do_sample, same
temperature, same prompts), and how close each is to the bound this CPU allows: the model's FLOPs per token
(2 × the parameters a token runs through: every linear layer and the tied LM head) over the GFLOP/s this
process measures for an fp32 matmul of the model's own shapes at the same number of rows. A sampler near that
bound cannot be made much faster on this machine without doing less arithmetic.

    python benchmarks/bench_sampler.py                            # rows 32, 64, 128; 24 and 128 new tokens
    python benchmarks/bench_sampler.py --rows 32 --new-tokens 24 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from preftune.config import GenerationConfig
from preftune.models import embedded_model_dir, load_model, load_tokenizer
from preftune.sampling import sample_ids

PROMPTS = [
    "The movie was",
    "I watched this film last night and",
    "Honestly, the acting in this one",
    "My review of the sequel:",
    "What surprised me most about the plot",
    "The director's new picture is",
    "From the opening scene I knew",
    "This documentary",
]


def linear_flops_per_token(model) -> int:
    """2 × the weights of every linear layer a token passes (the LM head included, embeddings looked up)."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_gflops(model, rows: int, repeats: int = 10) -> float:
    """fp32 GFLOP/s of the model's own linear shapes at ``rows`` rows (one pass over every distinct shape)."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    xs = [(torch.randn(rows, n_in), torch.randn(n_out, n_in)) for n_out, n_in in shapes]
    for x, w in xs:
        x @ w.T
    started = time.perf_counter()
    for _ in range(repeats):
        for x, w in xs:
            x @ w.T
    seconds = (time.perf_counter() - started) / repeats
    return 2 * rows * sum(o * i for o, i in shapes) / seconds / 1e9


def timed(fn, repeats: int) -> tuple[float, object]:
    out, times = fn(), []  # warm-up
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[24, 128])
    ap.add_argument("--k", type=int, default=4, help="completions per prompt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-generate", action="store_true", help="skip transformers' generate")
    args = ap.parse_args()
    path = str(embedded_model_dir())
    tok, model = load_tokenizer(path), load_model(path).eval()
    per_token = linear_flops_per_token(model)
    print(f"threads={torch.get_num_threads()} k={args.k} model linear FLOPs/token={per_token / 1e9:.3f} G\n")
    print("| rows | new tokens | preftune tok/s | % of matmul bound | generate tok/s | preftune / generate |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        n_prompts = max(1, rows // args.k)
        prompt_ids = [tok(PROMPTS[i % len(PROMPTS)] + f" (#{i})").input_ids for i in range(n_prompts)]
        bound = matmul_gflops(model, rows)
        for new in args.new_tokens:
            gen = GenerationConfig(max_new_tokens=new, temperature=1.0, top_p=1.0, batch_size=rows)

            def ours(prompt_ids=prompt_ids, gen=gen):
                # eos None: every row runs to max_new_tokens, as generate does below (equal work)
                return sample_ids(
                    model, prompt_ids, args.k, gen, eos_id=None, pad_id=tok.pad_token_id, seed=0
                )

            seconds, groups = timed(ours, args.repeats)
            generated = sum(len(c) for g in groups for c in g)
            prompt_tokens = sum(len(p) for p in prompt_ids)  # encoded once per prompt
            flops = per_token * (generated + prompt_tokens)
            ours_tps = generated / seconds
            share = flops / seconds / 1e9 / bound
            cell = "–"
            ratio = "–"
            if not args.no_generate:
                batch = tok.pad(
                    {"input_ids": [p for p in prompt_ids for _ in range(args.k)]}, return_tensors="pt",
                    padding_side="left",
                )  # fmt: skip

                def theirs(batch=batch, new=new):
                    with torch.no_grad():
                        return model.generate(
                            **batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                            min_new_tokens=new, pad_token_id=tok.pad_token_id,
                        )  # fmt: skip

                g_seconds, _ = timed(theirs, args.repeats)
                theirs_tps = n_prompts * args.k * new / g_seconds
                cell, ratio = f"{theirs_tps:.0f}", f"{ours_tps / theirs_tps:.2f}×"
            print(
                f"| {rows} | {new} | {ours_tps:.0f} | {100 * share:.0f}% ({bound:.0f} GFLOP/s) | {cell} | {ratio} |"
            )


if __name__ == "__main__":
    main()
