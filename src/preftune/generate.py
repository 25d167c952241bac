"""``preftune generate``: look at what a model writes — a run directory, a model or adapter folder, a hub id or
the embedded default — for prompts from a file (any prompt data set, ``builtin:movie_reviews_heldout``) or
the command line, through the one sampling path, optionally scored by reward functions."""

from __future__ import annotations

import json
from pathlib import Path

from .config import GenerationConfig
from .data import load_rows, validate_prompt_rows
from .models import load_for_inference, load_tokenizer, resolve_trained
from .rewards import load_reward, process_device, score_all
from .sampling import sample_responses


def generate(
    model: str | None,
    *,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    chat: bool = False,
    n: int = 1,
    gen: GenerationConfig | None = None,
    seed: int = 0,
    rewards: list[str] | None = None,
    limit: int | None = None,
    out: str | None = None,
    log=print,
) -> list[dict]:
    """Sample ``n`` completions per prompt; returns rows ``{prompt, completion, tokens[, reward, rewards]}``
    (also written to ``out`` as JSON Lines). ``chat`` wraps command-line prompts as user messages."""
    gen = gen or GenerationConfig()
    rows: list[dict] = []
    if prompts_file:
        rows = load_rows(prompts_file, keep_all=True)
        validate_prompt_rows(rows)
    for text in prompts or []:
        rows.append(
            {"prompt": [{"role": "user", "content": text}] if chat else text, "_source": "command line"}
        )
    if not rows:
        raise ValueError("no prompts: give --prompts FILE or --prompt TEXT")
    rows = rows[:limit] if limit else rows
    path = resolve_trained(model, log)
    tokenizer = load_tokenizer(path)
    net = load_for_inference(path).to(process_device()).eval()
    samples = sample_responses(
        net, tokenizer, [r["prompt"] for r in rows], k=n, seed=seed, progress=False,
        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, batch_size=gen.batch_size,
    )  # fmt: skip
    flat_prompts, completions = samples.flat()
    ids = samples.flat_ids()
    result = [
        {"prompt": p, "completion": c, "tokens": len(i)} for p, c, i in zip(flat_prompts, completions, ids)
    ]
    if rewards:
        functions = [load_reward(spec) for spec in rewards]
        per_row = [r for r in rows for _ in range(n)]
        names = sorted({k for r in rows for k in r if k not in ("prompt", "_source")})
        columns = {name: [r.get(name) for r in per_row] for name in names}
        totals, per_function = score_all(functions, flat_prompts, completions, ids, columns)
        for i, row in enumerate(result):
            row["reward"] = totals[i]
            row["rewards"] = {name: values[i] for name, values in per_function.items()}
    if out:
        Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result))
    return result


def print_rows(rows: list[dict]) -> None:
    previous = object()
    for row in rows:
        if row["prompt"] != previous:
            prompt = (
                row["prompt"]
                if isinstance(row["prompt"], str)
                else json.dumps(row["prompt"], ensure_ascii=False)
            )
            print(f"\n### {prompt}")
            previous = row["prompt"]
        reward = f"  [reward {row['reward']:.3f}]" if row.get("reward") is not None else ""
        print(f"--> {row['completion']!r}{reward}")
