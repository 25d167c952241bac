"""The one sampling path: K completions per prompt from a causal LM, for the experiment's data, online
training and ``preftune generate``.

How (:func:`sample_ids`): a batch of prompts is left-padded and **prefilled once**; the KV cache and the
last position's logits are then repeated K times (``DynamicCache.batch_repeat_interleave``), so a group's
shared prompt is encoded once, not K times. Decoding feeds one token per live row with explicit position
ids (left padding does not shift positions); a row stops at its first EOS, and finished rows are dropped
from the batch (``batch_select_indices``) once a quarter of the batch has finished, so they cost nothing
more. Models whose cache cannot be repeated fall back to prefilling every copy of the prompt.

Randomness is keyed, not streamed: completion j of the prompt with key k (its index in the data) draws
its uniforms from its own generator, seeded with ``derive_seed(seed, k, j)``, one per decode step, and
samples each token by inverse CDF. The tokens therefore depend only on (seed, prompt, slot, model): not on
the batch size, prefix sharing, when finished rows are dropped, or which process samples the prompt (so
several processes sample what one process would), and two seeds never share a stream.

Sampling is pure ancestral sampling from the model when ``temperature=1, top_p=1`` (no top-k, no
repetition penalty, no model-specific generation defaults): only then are the samples draws from π_θ,
which a KL estimate from the samples assumes (at T ≠ 1 they are draws from softmax(z/T), the policy online
training trains; top_p < 1 is a distribution no log-prob path gives). ``temperature=0`` is greedy. Prompts
are tokenised by the data layer's prompt rule (:func:`preftune.data.prompt_ids`).

:func:`sample_ids_and_logps` also returns each sampled token's log-prob under the distribution it was drawn
from before any top_p cut, log_softmax(z/T) of the sampler's own fp32 logits (log_softmax(z) at T = 0): the
log π_sample that online training compares its own log π_θ with (``sampling/logp_diff_*``).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .data.collate import collate_prompts
from .data.tokenize import prompt_ids as tokenize_prompt
from .models import device_of, unwrap_model

COMPACT_FRACTION = 0.25  # drop finished rows once this share of the batch has finished


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, names): streams with different parts never share a seed."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def picked_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[token] per row, fp32 (R,): ``logits`` (R, V), ``tokens`` (R,); T = 0 (greedy)
    and T = 1 take the logits as they are."""
    z = logits.float()
    if temperature not in (0, 1):
        z = z / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from ``logits`` (R, V) by inverse CDF with uniforms ``u`` (R,) in [0, 1).

    temperature 0: argmax. top_p < 1: the smallest set of most likely tokens whose mass reaches top_p
    (at least one), renormalised.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    cdf = probs.cumsum(dim=-1)  # (R, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (R, 1): scaled to the kept mass
    index = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    return index if order is None else order.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: ``cache`` in transformers 5.x (which removes ``past_key_values``
    in 5.40), ``past_key_values`` in 4.x and in models that do not take ``cache``. Read from the forward's
    signature of the transformers model under any wrapper (DDP, PEFT)."""
    base = unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _forward_last(
    model, cache=None, *, keyword: str = "past_key_values", **kwargs
) -> tuple[torch.Tensor, object]:
    """Logits of the last position only (R, V) fp32, and the cache (passed and read back under ``keyword``,
    :func:`cache_keyword`)."""
    if cache is not None:
        kwargs[keyword] = cache
    try:
        out = model(**kwargs, use_cache=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = model(**kwargs, use_cache=True)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1].float(), cache if cache is not None else out.past_key_values


def _can_share(cache) -> bool:
    return hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")


@torch.no_grad()
def _sample_batch(
    model, prompts: Sequence[Sequence[int]], k: int, gen: GenerationConfig, *, eos_id, pad_id,
    rngs: list[random.Random], share_prefix: bool, logps: list[list[float]] | None = None,
) -> tuple[list[list[int]], int]:  # fmt: skip
    """K completions of each prompt in one batch, rows in order (prompt 0 × K, prompt 1 × K, ...); row r
    draws its uniforms from ``rngs[r]``. With ``logps`` (a list), each row's sampled tokens' log-probs
    (:func:`picked_logps`) are appended to it, one list per row."""
    device = device_of(model)
    rows = len(prompts) * k
    shared = share_prefix
    batch = collate_prompts(prompts if shared else [p for p in prompts for _ in range(k)], pad_id)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, L) or (B·K, L)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keyword = cache_keyword(model)
    last, cache = _forward_last(
        model, keyword=keyword, input_ids=ids, attention_mask=mask, position_ids=positions
    )
    if shared and not _can_share(cache):  # fall back: prefill every copy
        return _sample_batch(
            model, prompts, k, gen, eos_id=eos_id, pad_id=pad_id, rngs=rngs, share_prefix=False, logps=logps
        )
    if shared:
        cache.batch_repeat_interleave(k)
        last, mask = last.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    position = positions[:, -1].repeat_interleave(k, 0) if shared else positions[:, -1]  # (R,)
    alive = torch.arange(rows, device=device)  # original row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # finished rows still in the batch
    out: list[list[int]] = [[] for _ in range(rows)]
    out_logps: list[list[float]] = [[] for _ in range(rows)]
    for t in range(gen.max_new_tokens):
        u = torch.tensor([rngs[r].random() for r in alive.tolist()], dtype=torch.float64)  # one per live row
        token = pick_tokens(last, u, gen.temperature, gen.top_p)  # (R_alive,)
        picked = picked_logps(last, token, gen.temperature).tolist() if logps is not None else None
        for i, (r, tok, fin) in enumerate(zip(alive.tolist(), token.tolist(), done.tolist())):
            if not fin:
                out[r].append(tok)
                if picked is not None:
                    out_logps[r].append(picked[i])
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()) or t == gen.max_new_tokens - 1:
            break
        if _can_share(cache) and int(done.sum()) >= COMPACT_FRACTION * len(alive):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, mask, position, token, done = (x[keep] for x in (alive, mask, position, token, done))
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=-1)
        last, cache = _forward_last(
            model, cache, keyword=keyword, input_ids=token.unsqueeze(-1), attention_mask=mask,
            position_ids=position.unsqueeze(-1),
        )  # fmt: skip
    if logps is not None:
        logps.extend(out_logps)
    return out, sum(len(o) for o in out)


def sample_ids(
    model,
    prompts: Sequence[Sequence[int]],
    k: int,
    gen: GenerationConfig,
    *,
    eos_id: int | None,
    pad_id: int,
    seed: int,
    keys: Sequence[int] | None = None,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[list[list[int]]]:
    """``k`` completions (token ids, ending at and including the first EOS, if any) of each prompt.

    ``gen.batch_size`` rows (prompt copies) per batch, so ``max(1, batch_size // k)`` prompts per batch.
    ``keys`` (default: the prompts' positions) identify the prompts for the random draws: completion j of
    the prompt with key q uses ``derive_seed(seed, q, j)``. The model's mode is restored afterwards.
    """
    return _sample_ids(
        model, prompts, k, gen, eos_id=eos_id, pad_id=pad_id, seed=seed, keys=keys, share_prefix=share_prefix,
        progress=progress, logps=None,
    )  # fmt: skip


def sample_ids_and_logps(
    model,
    prompts: Sequence[Sequence[int]],
    k: int,
    gen: GenerationConfig,
    *,
    eos_id: int | None,
    pad_id: int,
    seed: int,
    keys: Sequence[int] | None = None,
    share_prefix: bool = True,
    progress: bool = False,
) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
    """:func:`sample_ids` (the same tokens) and, in the same nesting, each sampled token's log-prob under the
    distribution the sampler drew it from, log_softmax(z/T) of its fp32 logits z (:func:`picked_logps`;
    before any top_p cut)."""
    logps: list[list[float]] = []
    groups = _sample_ids(
        model, prompts, k, gen, eos_id=eos_id, pad_id=pad_id, seed=seed, keys=keys, share_prefix=share_prefix,
        progress=progress, logps=logps,
    )  # fmt: skip
    return groups, [logps[i * k : (i + 1) * k] for i in range(len(groups))]


def _sample_ids(
    model, prompts, k: int, gen: GenerationConfig, *, eos_id, pad_id, seed: int, keys, share_prefix: bool,
    progress: bool, logps: list[list[float]] | None,
) -> list[list[list[int]]]:  # fmt: skip
    from tqdm.auto import tqdm

    from .training.sharding import gathered

    if k < 1 or gen.max_new_tokens < 1 or gen.batch_size < 1:
        raise ValueError(
            f"k, max_new_tokens and batch_size must be >= 1 (got {k}, {gen.max_new_tokens}, {gen.batch_size})"
        )
    if gen.temperature < 0 or not 0 < gen.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {gen.temperature}, {gen.top_p}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot sample from an empty prompt")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts")
    net = unwrap_model(model)  # generation needs no gradient synchronisation
    was_training = net.training
    net.eval()
    per_batch = max(1, gen.batch_size // k)
    result: list[list[list[int]]] = []
    bar = tqdm(total=len(prompts) * k, unit="seq", desc="sampling", disable=not progress)
    n_tokens, started = 0, time.perf_counter()
    # a sharded model (training.sharding: fsdp): all-gathered once for the whole decode loop, resharded after
    with gathered(net):
        try:
            for first in range(0, len(prompts), per_batch):
                chunk = prompts[first : first + per_batch]
                rngs = [
                    random.Random(derive_seed(seed, q, j))
                    for q in keys[first : first + per_batch]
                    for j in range(k)
                ]
                rows, tokens = _sample_batch(
                    net, chunk, k, gen, eos_id=eos_id, pad_id=pad_id, rngs=rngs, share_prefix=share_prefix,
                    logps=logps,
                )  # fmt: skip
                result.extend(rows[i * k : (i + 1) * k] for i in range(len(chunk)))
                n_tokens += tokens
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
        finally:
            bar.close()
            net.train(was_training)
    return result


@dataclass
class Samples:
    """Sampled responses; the outer lists are per prompt, the inner per sample slot (K).

    ``response_ids[i][j]`` are the generated tokens only (no prompt, no padding), ending
    with the EOS token if one was generated (then nothing after it); ``responses[i][j]``
    is their text decoded with ``skip_special_tokens=True``.
    """

    prompts: list
    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    responses: list[list[str]]
    logps: list[list[float]] | None = None  # each sample's log-prob under the sampler (``logps=True``)

    @property
    def k(self) -> int:
        return len(self.responses[0]) if self.responses else 0

    def flat(self) -> tuple[list, list[str]]:
        """``(prompts, responses)`` flattened row by row: each prompt repeated K times."""
        prompts = [p for p, rs in zip(self.prompts, self.responses) for _ in rs]
        return prompts, [r for rs in self.responses for r in rs]

    def flat_ids(self) -> list[list[int]]:
        return [ids for group in self.response_ids for ids in group]

    def records(self, scores: list[float]) -> list[dict]:
        """One record per prompt, ``{"prompt", "responses", "scores"}`` (and ``"logps"`` when sampled with
        them), from flat scores."""
        n = sum(len(rs) for rs in self.responses)
        if len(scores) != n:
            raise ValueError(f"got {len(scores)} scores for {n} responses")
        out, pos = [], 0
        for i, (prompt, rs) in enumerate(zip(self.prompts, self.responses)):
            out.append({"prompt": prompt, "responses": list(rs), "scores": list(scores[pos : pos + len(rs)])})
            if self.logps is not None:
                out[-1]["logps"] = list(self.logps[i])
            pos += len(rs)
        return out


def sample_responses(
    model,
    tokenizer,
    prompts: list,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    logps: bool = False,
) -> Samples:
    """Sample ``k`` continuations of each prompt (texts or message lists) and decode them.

    Args:
        model: a causal LM (its mode is restored afterwards).
        tokenizer: its tokenizer; pad id = ``pad_token_id``, else ``eos_token_id``.
        prompts: texts to continue, or conversations (the chat template's generation prompt is added).
        k: samples per prompt.
        max_new_tokens: response length limit (responses without EOS were cut here).
        temperature: 1.0 samples from the model; 0 is greedy.
        top_p: nucleus mass (1.0 = off).
        batch_size: rows (prompt copies) per batch.
        seed: completion j of prompt i uses ``derive_seed(seed, i, j)`` (independent of ``batch_size``).
        progress: show a tqdm bar with generated tokens/s.
        logps: also keep each sample's log-prob log π(y|x) at ``temperature`` (:func:`sequence_logps_of`).
    """
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token")
    prompt_ids = [tokenize_prompt(tokenizer, prompt) for prompt in prompts]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to no tokens")
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size
    )
    sequence_logps = None
    if logps:
        response_ids, token_logps = sample_ids_and_logps(
            model, prompt_ids, k, gen, eos_id=eos_id, pad_id=pad_id, seed=seed, progress=progress
        )
        sequence_logps = sequence_logps_of(token_logps)
    else:
        response_ids = sample_ids(
            model, prompt_ids, k, gen, eos_id=eos_id, pad_id=pad_id, seed=seed, progress=progress
        )
    responses = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in response_ids]
    return Samples(
        prompts=list(prompts), prompt_ids=prompt_ids, response_ids=response_ids, responses=responses,
        logps=sequence_logps,
    )  # fmt: skip


def sequence_logps_of(token_logps: list[list[list[float]]]) -> list[list[float]]:
    """Each sample's log π(y|x), the sum of its tokens' log-probs from :func:`sample_ids_and_logps` (same
    nesting, prompt then slot), summed in float64."""
    return [[math.fsum(tokens) for tokens in group] for group in token_logps]


def generation_kwargs(gen: GenerationConfig) -> dict:
    """The :func:`sample_responses` keywords of a generation section."""
    return {
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "batch_size": gen.batch_size,
    }
