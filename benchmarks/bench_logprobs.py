"""Benchmark the log-prob path and the reference strategy on the embedded SmolLM2-135M (CPU or GPU).

Compares, in one process on the same batches:
  1. response-only head (preftune's ``sequence_logps``: LM head + log-softmax on response positions only)
     against the full-logits path (head on every position, then gather — what a plain forward does);
  2. a DPO training step with precomputed reference log-probs against one that runs the reference
     forward every step (TRL's default).
Prints throughput (tokens/s), time per step, the size of the logits tensor each path materialises, and
ratios. Usage: python benchmarks/bench_logprobs.py [--pairs 8] [--prompt-len 32] [--response-len 96]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from preftune.logprobs import pack_sequences, sequence_logps
from preftune.losses import dpo_loss
from preftune.models import embedded_model_dir, load_model, load_tokenizer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    model = load_model(path)
    vocab = model.config.vocab_size
    n = 2 * args.pairs
    prompts = [torch.randint(100, vocab - 100, (args.prompt_len,)).tolist() for _ in range(n)]
    responses = [torch.randint(100, vocab - 100, (args.response_len,)).tolist() for _ in range(n)]
    batch = pack_sequences(prompts, responses, tok.pad_token_id)
    seq = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    tokens = int(batch["attention_mask"].sum())
    m_resp = int(batch["response_mask"][:, 1:].sum())
    t_full = batch["input_ids"].numel()
    print(
        f"device=cpu threads={torch.get_num_threads()} pairs={args.pairs} seq_len={batch['input_ids'].shape[1]} "
        f"tokens/batch={tokens}"
    )

    # 1. log-prob path, forward + backward
    model.train()

    def step(fast: bool):
        model.zero_grad(set_to_none=True)
        s, _ = sequence_logps(model, *seq, fast=fast)
        s.sum().backward()

    fast = timed(lambda: step(True), args.repeats)
    slow = timed(lambda: step(False), args.repeats)
    with torch.no_grad():
        a, _ = sequence_logps(model, *seq, fast=True)
        b, _ = sequence_logps(model, *seq, fast=False)
    print("\n[1] log-probs, forward+backward of one batch")
    print(
        f"  response-only head : {fast:.3f} s  {tokens / fast:8.0f} tok/s  logits {m_resp}x{vocab} fp32 = "
        f"{m_resp * vocab * 4 / 2**20:.0f} MiB"
    )
    print(
        f"  full-logits        : {slow:.3f} s  {tokens / slow:8.0f} tok/s  logits {t_full}x{vocab} fp32 = "
        f"{t_full * vocab * 4 / 2**20:.0f} MiB"
    )
    print(
        f"  speed-up {slow / fast:.2f}x, logits memory {t_full / m_resp:.2f}x smaller; "
        f"max |difference| {float((a - b).abs().max()):.2e}"
    )

    # 2. DPO step: precomputed reference vs reference forward each step
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        ref = sequence_logps(ref_model, *seq)[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)

    def dpo_step(precomputed: bool):
        if precomputed:
            r = ref
        else:
            with torch.no_grad():
                r = sequence_logps(ref_model, *seq)[0]
        s, _ = sequence_logps(model, *seq)
        b_ = args.pairs
        loss = dpo_loss(s[:b_], s[b_:], r[:b_], r[b_:], beta=0.1).losses.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    pre = timed(lambda: dpo_step(True), args.repeats)
    live = timed(lambda: dpo_step(False), args.repeats)
    print("\n[2] DPO optimizer step")
    print(
        f"  precomputed reference : {pre:.3f} s/step  {args.pairs / pre:6.2f} pairs/s  (no reference copy in memory)"
    )
    print(f"  reference each step   : {live:.3f} s/step  {args.pairs / live:6.2f} pairs/s")
    print(f"  speed-up {live / pre:.2f}x")


if __name__ == "__main__":
    main()
