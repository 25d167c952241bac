"""One held-out evaluation's passes, timed in one process on the embedded SmolLM2-135M-Instruct (fp32), the
experiment's shape (64 prompts × 3 samples of ≤ 24 new tokens): sampling with the per-token log-probs kept,
the policy's re-scoring pass that those log-probs replace in fp32 (what each evaluation ran before), and the
reference's pass, which stays. Also checks that the sampler's sequence log-probs equal the re-scoring pass's.

    python benchmarks/bench_eval.py                   # batch 96 and 192 rows, 2 repeats
    python benchmarks/bench_eval.py --batch 192 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_sampler import PROMPTS as OPENINGS  # the sampler benchmark's review openings

from preftune.config import GenerationConfig
from preftune.data.tokenize import prompt_ids as tokenize_prompt
from preftune.heldout import sample_groups
from preftune.logprobs import score_groups
from preftune.models import embedded_model_dir, load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, nargs="+", default=[96, 192])
    ap.add_argument("--logp-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    path = str(embedded_model_dir(log=lambda *a: None))
    tok = load_tokenizer(path)
    model = load_model(path, dtype="float32").eval()
    texts = [f"{OPENINGS[i % len(OPENINGS)]} (review {i})" for i in range(args.prompts)]
    ids = [tokenize_prompt(tok, t) for t in texts]
    print(
        f"torch threads {torch.get_num_threads()}; {args.prompts} prompts x {args.k}, <= {args.new_tokens} tokens"
    )
    for batch in args.batch:
        gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, batch_size=batch)
        times: dict[str, list[float]] = {"sample (log-probs kept)": [], "policy re-score (dropped)": []}
        for r in range(args.repeats):
            t = time.perf_counter()
            groups, sampled = sample_groups(
                model, ids, args.k, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=r
            )
            times["sample (log-probs kept)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                sums, _ = score_groups(
                    model, ids, groups, pad_token_id=tok.pad_token_id, batch_size=args.logp_batch
                )
            times["policy re-score (dropped)"].append(time.perf_counter() - t)
            flat = torch.tensor([x for g in sampled for x in g], dtype=torch.float64)
            gap = float((flat - sums.double()).abs().max())
            n_tokens = sum(len(c) for g in groups for c in g)
            print(
                f"  batch {batch}, repeat {r}: {n_tokens} tokens; max |sampler - re-score| = {gap:.2e} nats"
            )
        for name, values in times.items():
            print(
                f"batch {batch}: {name}: median {statistics.median(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
            )
        print("  (the reference's pass costs as much as the policy re-score: same model size, same tokens)")


if __name__ == "__main__":
    main()
