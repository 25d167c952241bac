"""The sampling path: inverse-CDF token choice on known numbers, prefix-shared KV-cached sampling against
plain and no-cache reference sampling, keyed randomness (batch size, keys), and the sampled distribution."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_tiny_model

from preftune.config import GenerationConfig
from preftune.data import collate_prompts
from preftune.sampling import derive_seed, pick_tokens, sample_ids, sample_ids_and_logps


def test_pick_tokens_known_numbers():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(3, 1)
    u = torch.tensor([0.1, 0.6, 0.9])
    assert pick_tokens(logits, u, 1.0, 1.0).tolist() == [0, 1, 2]  # cdf 0.5, 0.8, 1.0
    # top_p 0.6 keeps the two most likely (0.5 < 0.6 before the second), renormalised to 0.625, 0.375
    assert pick_tokens(logits, torch.tensor([0.6, 0.7, 0.99]), 1.0, 0.6).tolist() == [0, 1, 1]
    assert pick_tokens(logits, u, 0.0, 1.0).tolist() == [0, 0, 0]  # greedy
    # the order of probabilities does not matter for top_p: the kept set is the most likely ones
    shuffled = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert pick_tokens(shuffled, torch.tensor([0.1]), 1.0, 0.6).tolist() == [1]


@pytest.fixture(scope="module")
def eos_model(tiny_tokenizer):
    """The tiny random Llama with a raised EOS logit, so completions end at different lengths."""
    model = build_tiny_model(tiny_tokenizer, seed=7).eval()
    eos = tiny_tokenizer.eos_token_id

    def bias(module, args, logits):
        out = logits.clone()
        out[..., eos] += 3.0
        return out

    model.lm_head.register_forward_hook(bias)
    return model


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]


def _sample(model, tok, **kw):
    gen = GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 12), batch_size=kw.pop("batch_size", 64))
    return sample_ids(model, PROMPTS, 4, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, **kw)


def test_prefix_shared_sampling_equals_plain_sampling(eos_model, tiny_tokenizer):
    shared = _sample(eos_model, tiny_tokenizer)
    plain = _sample(eos_model, tiny_tokenizer, share_prefix=False)
    assert shared == plain
    flat = [c for group in shared for c in group]
    eos = tiny_tokenizer.eos_token_id
    lengths = {len(c) for c in flat}
    assert len(lengths) > 2 and any(c[-1] == eos for c in flat)  # rows finished at different steps
    assert all(eos not in c[:-1] for c in flat) and all(1 <= len(c) <= 12 for c in flat)


def _slow_sample(model, prompt: list[int], rng: random.Random, steps: int, eos: int) -> list[int]:
    """No cache, one sequence: a full forward over prompt + completion at every step."""
    out: list[int] = []
    for _ in range(steps):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        token = int(pick_tokens(logits, torch.tensor([rng.random()], dtype=torch.float64), 1.0, 1.0))
        out.append(token)
        if token == eos:
            break
    return out


def test_cached_sampling_equals_a_slow_reference(eos_model, tiny_tokenizer):
    fast = _sample(eos_model, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    for i, prompt in enumerate(PROMPTS):
        for j in range(4):
            rng = random.Random(derive_seed(3, i, j))
            assert fast[i][j] == _slow_sample(eos_model, prompt, rng, 12, eos), (i, j)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_the_samplers_log_probs_are_log_softmax_over_temperature(eos_model, tiny_tokenizer, temperature):
    """:func:`sample_ids_and_logps` gives :func:`sample_ids`'s tokens and, for each, log_softmax(z/T) of a
    plain no-cache forward over prompt + completion (left-padded prompts, finished rows dropped)."""
    tok = tiny_tokenizer
    gen = GenerationConfig(max_new_tokens=12, batch_size=64, temperature=temperature)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3)
    groups, logps = sample_ids_and_logps(eos_model, PROMPTS, 4, gen, **kw)
    assert groups == sample_ids(eos_model, PROMPTS, 4, gen, **kw)
    assert len({len(c) for group in groups for c in group}) > 2  # rows finished at different steps
    for prompt, group, group_logps in zip(PROMPTS, groups, logps, strict=True):
        for completion, got in zip(group, group_logps, strict=True):
            with torch.no_grad():
                z = eos_model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(z.double() / temperature, -1)[range(len(completion)), completion]
            assert len(got) == len(completion)
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5, rtol=0)


def test_samples_do_not_depend_on_batch_size_or_batch_companions(eos_model, tiny_tokenizer):
    assert _sample(eos_model, tiny_tokenizer, batch_size=4) == _sample(
        eos_model, tiny_tokenizer, batch_size=64
    )
    gen = GenerationConfig(max_new_tokens=12, batch_size=64)
    tok = tiny_tokenizer
    together = sample_ids(
        eos_model, PROMPTS[:2], 4, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, keys=[7, 9]
    )
    alone = sample_ids(
        eos_model, PROMPTS[1:2], 4, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, keys=[9]
    )
    assert together[1] == alone[0]  # a prompt's completions depend on its key, not on its companions


def test_left_padding_does_not_change_greedy_completions(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=2).eval()
    tok = tiny_tokenizer
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0, batch_size=8)
    alone = sample_ids(model, [PROMPTS[3]], 1, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    padded = sample_ids(
        model, [PROMPTS[2], PROMPTS[3]], 1, gen, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0
    )
    assert padded[1] == alone[0]
    assert collate_prompts([PROMPTS[2], PROMPTS[3]], tok.pad_token_id)["attention_mask"][1].tolist() == [
        0,
        0,
        0,
        0,
        1,
    ]


def test_first_tokens_follow_the_models_distribution(tiny_tokenizer):
    """4000 one-token samples: each of the three likeliest tokens appears with its probability (± 4 SE)."""
    model = build_tiny_model(tiny_tokenizer, seed=3).eval()
    model.lm_head.register_forward_hook(lambda m, a, out: out * 8)  # a peaked distribution
    tok = tiny_tokenizer
    prompt = [5, 6, 7]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
    gen = GenerationConfig(max_new_tokens=1, batch_size=512)
    n = 4000
    groups = sample_ids(model, [prompt], n, gen, eos_id=None, pad_id=tok.pad_token_id, seed=11)
    counts = torch.bincount(torch.tensor([c[0] for c in groups[0]]), minlength=len(probs)).float()
    for token in probs.topk(3).indices.tolist():
        p = float(probs[token])
        assert abs(float(counts[token]) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, p)


def test_bad_arguments(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    gen = GenerationConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        sample_ids(model, [[]], 2, gen, eos_id=None, pad_id=0, seed=0)
    with pytest.raises(ValueError, match="keys"):
        sample_ids(model, [[1]], 2, gen, eos_id=None, pad_id=0, seed=0, keys=[1, 2])
