"""Sample K continuations per prompt from a causal LM: the one sampling path (offline experiment data,
online training, ``preftune generate``).

Prompts are tokenised by the data layer's prompt rule (:func:`preftune.data.prompt_ids`: a plain
text gets one BOS token where the tokenizer adds one, never two), left-padded into batches with an
attention mask built here, and continued by ``model.generate``. Rows are the prompts repeated K times in
order (prompt 0 × K, prompt 1 × K, ...), ``batch_size`` rows per batch.

Sampling is pure ancestral sampling from the model when ``temperature=1, top_p=1``:
``top_k=0`` and a neutral generation config are used, so defaults stored in the model's
``generation_config`` (repetition penalty, top-k 50, ...) do not apply. Only then are the
samples draws from π_θ, which the sequence-level KL estimate in
a sequence-level KL estimate from the samples assumes. ``temperature=0`` is greedy.

Reproducibility: batch b is generated after ``torch.manual_seed(derive_seed(seed, b))`` inside
``torch.random.fork_rng`` (the caller's RNG state is left as it was), so the same
prompts, k, batch_size, seed, model and device give the same samples, and two streams with
different seeds never reuse each other's batch seeds (as ``seed + b`` would).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .config import GenerationConfig
from .data.collate import collate_prompts
from .data.tokenize import prompt_ids as tokenize_prompt


@dataclass
class Samples:
    """Sampled responses; the outer lists are per prompt, the inner per sample slot (K).

    ``response_ids[i][j]`` are the generated tokens only (no prompt, no padding), ending
    with the EOS token if one was generated (then nothing after it); ``responses[i][j]``
    is their text decoded with ``skip_special_tokens=True``.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    responses: list[list[str]]

    @property
    def k(self) -> int:
        return len(self.responses[0]) if self.responses else 0

    def flat(self) -> tuple[list[str], list[str]]:
        """``(prompts, responses)`` flattened row by row: each prompt repeated K times."""
        prompts = [p for p, rs in zip(self.prompts, self.responses) for _ in rs]
        return prompts, [r for rs in self.responses for r in rs]

    def records(self, scores: list[float]) -> list[dict]:
        """One record per prompt, ``{"prompt", "responses", "scores"}``, from flat scores."""
        n = sum(len(rs) for rs in self.responses)
        if len(scores) != n:
            raise ValueError(f"got {len(scores)} scores for {n} responses")
        out, pos = [], 0
        for prompt, rs in zip(self.prompts, self.responses):
            out.append({"prompt": prompt, "responses": list(rs), "scores": list(scores[pos : pos + len(rs)])})
            pos += len(rs)
        return out


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, names): streams with different parts never share a seed."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Plain-text prompts through the data layer's prompt rule (one BOS where the tokenizer adds one)."""
    encoded = [tokenize_prompt(tokenizer, prompt) for prompt in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to no tokens")
    return encoded


def _cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; what follows it is padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Samples:
    """Sample ``k`` continuations of each prompt; see the module docstring.

    Args:
        model: a causal LM with ``generate`` (put in eval mode; its mode is restored).
        tokenizer: its tokenizer; pad id = ``pad_token_id``, else ``eos_token_id``.
        prompts: texts to continue.
        k: samples per prompt.
        max_new_tokens: response length limit (responses without EOS were cut here).
        temperature: 1.0 samples from the model; 0 is greedy.
        top_p: nucleus mass (1.0 = off).
        batch_size: rows (prompt copies) per ``generate`` call.
        seed: batch b uses ``torch.manual_seed(derive_seed(seed, b))``.
        progress: show a tqdm bar with generated tokens/s.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"k, max_new_tokens and batch_size must be >= 1 (got {k}, {max_new_tokens}, {batch_size})"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token")

    prompt_ids = _encode(tokenizer, prompts)
    rows = [i for i in range(len(prompts)) for _ in range(k)]  # prompt index of each row
    if temperature == 0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    special = {"pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": tokenizer.bos_token_id}
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, **sampling, **special)

    device = next(model.parameters()).device
    rng_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    was_training, saved_config = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig(**special)  # no model-specific sampling defaults
    flat_ids: list[list[int]] = []
    bar = tqdm(total=len(rows), unit="seq", desc="sampling", disable=not progress)
    n_tokens, start = 0, time.perf_counter()
    try:
        for b, first in enumerate(range(0, len(rows), batch_size)):
            batch = [prompt_ids[i] for i in rows[first : first + batch_size]]
            padded = collate_prompts(batch, pad_id)
            input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]  # (B, L)
            with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
                torch.manual_seed(derive_seed(seed, b))
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                )  # (B, L + T), T <= max_new_tokens
            for new in out[:, input_ids.shape[1] :].tolist():
                ids = _cut_at_eos(new, eos_id)
                flat_ids.append(ids)
                n_tokens += len(ids)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        bar.close()
        model.generation_config = saved_config
        model.train(was_training)

    response_ids = [flat_ids[i * k : (i + 1) * k] for i in range(len(prompts))]
    responses = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in response_ids]
    return Samples(
        prompts=list(prompts), prompt_ids=prompt_ids, response_ids=response_ids, responses=responses
    )


def generation_kwargs(gen: GenerationConfig) -> dict:
    """The :func:`sample_responses` keywords of a generation section."""
    return {
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "batch_size": gen.batch_size,
    }
