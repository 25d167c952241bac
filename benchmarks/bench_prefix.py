"""Prefix sharing for pairs: a DPO step whose chosen and rejected responses share one encoding of their prompt,
against the plain batch that encodes the prompt twice, in one process on the same pairs (embedded
SmolLM2-135M-Instruct, fp32). Prints seconds per step (forward, backward and the fused AdamW step; median
after a warm-up), the tokens each path runs through the model, the speed-up, and the largest difference in
the per-pair log-probs (they must agree).

    python benchmarks/bench_prefix.py                       # short (29-token) and long (296-token) prompts
    python benchmarks/bench_prefix.py --pairs 4 --prompt-lens 29 296 --response-len 55
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from preftune.logprobs import pair_sequence_logps
from preftune.losses import dpo_loss
from preftune.models import embedded_model_dir, load_model, load_tokenizer


def step_time(
    model, optimizer, prompts, chosen, rejected, ref, pad, share: bool, repeats: int
) -> tuple[float, torch.Tensor]:
    def step():
        logps = pair_sequence_logps(model, prompts, chosen, rejected, pad, share_prefix=share)
        b = len(prompts)
        loss = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.1).losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logps.detach()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = step()  # warm-up (allocates the optimizer state); its log-probs are the starting model's
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    model.load_state_dict(state)
    optimizer.state.clear()
    return statistics.median(times), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[29, 296])
    ap.add_argument("--response-len", type=int, default=55)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = str(embedded_model_dir())
    tok, model = load_tokenizer(path), load_model(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    vocab = model.config.vocab_size
    print(f"threads={torch.get_num_threads()} pairs={args.pairs} response_len={args.response_len}\n")
    print(
        "| prompt tokens | plain s/step | shared s/step | speed-up | tokens plain → shared | max Δ log-prob |"
    )
    print("|---|---|---|---|---|---|")
    for plen in args.prompt_lens:
        rand = lambda n: torch.randint(100, vocab - 100, (n,)).tolist()  # noqa: E731
        prompts = [rand(plen) for _ in range(args.pairs)]
        chosen = [rand(args.response_len) for _ in range(args.pairs)]
        rejected = [rand(args.response_len - 5) for _ in range(args.pairs)]
        ref = torch.zeros(2 * args.pairs)
        plain, lp_plain = step_time(
            model, optimizer, prompts, chosen, rejected, ref, tok.pad_token_id, False, args.repeats
        )
        shared, lp_shared = step_time(
            model, optimizer, prompts, chosen, rejected, ref, tok.pad_token_id, True, args.repeats
        )
        n_plain = 2 * plen * args.pairs + sum(map(len, chosen + rejected))
        n_shared = plen * args.pairs + sum(map(len, chosen + rejected))
        diff = float((lp_plain - lp_shared).abs().max())
        print(
            f"| {plen} | {plain:.2f} | {shared:.2f} | {plain / shared:.2f}x | {n_plain} → {n_shared} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
