"""preftune.logprobs: the fast path (head on response positions only) against a full forward and a hand
loop; prompt and padding excluded; empty responses; ``score_responses`` keeps input order."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from preftune.logprobs import pack_sequences, score_groups, score_responses, sequence_logps, token_logps

KEYS = ("input_ids", "attention_mask", "response_mask")


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = build_tiny_model(tiny_tokenizer, seed=1)
    return m.eval()


@pytest.fixture(scope="module")
def pad_id(tiny_tokenizer):
    return tiny_tokenizer.pad_token_id


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    """(prompt ids, response ids) of different lengths, so rows are padded differently."""
    eos = tiny_tokenizer.eos_token_id
    texts = [
        ("The movie was", " great and the acting was wonderful."),
        ("I loved the story,", " the music and the ending."),
        ("What a waste of time;", " no."),
        (
            "Hello world. A good day for a review of a bad film.",
            " The film was terrible, boring and far too long.",
        ),
        ("yes", " maybe"),
    ]
    return [(enc(tiny_tokenizer, p), enc(tiny_tokenizer, r) + [eos]) for p, r in texts]


def hand_logps(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> float:
    """log p(response | prompt) from one unpadded full forward: log_softmax of the logits / T, gathered."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = (model(input_ids=ids).logits / temperature).log_softmax(-1)[0]  # (T, V)
    total = 0.0
    for k, token in enumerate(response):
        t = len(prompt) + k  # position of the token; predicted at t - 1
        total += float(logp[t - 1, token])
    return total


def run(model, batch, **kw):
    with torch.no_grad():
        return sequence_logps(model, *(batch[k] for k in KEYS), **kw)


def test_fast_path_equals_full_forward(model, pairs, pad_id):
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    fast, n_fast = run(model, batch)
    slow, n_slow = run(model, batch, fast=False)
    assert fast.dtype == torch.float32 and fast.shape == (len(pairs),)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert torch.equal(n_fast, n_slow)
    assert n_fast.tolist() == [len(r) for _, r in pairs]


def test_token_logps_fast_equals_slow_per_token(model, pairs, pad_id):
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    with torch.no_grad():
        fast, rows_fast = token_logps(model, *(batch[k] for k in KEYS))
        slow, rows_slow = token_logps(model, *(batch[k] for k in KEYS), fast=False)
    assert fast.shape == (sum(len(r) for _, r in pairs),)
    assert torch.equal(rows_fast, rows_slow)
    assert rows_fast.tolist() == [i for i, (_, r) in enumerate(pairs) for _ in r]
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert (fast < 0).all()


def test_equals_hand_loop_over_log_softmax(model, pairs, pad_id):
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    sums, _ = run(model, batch)
    expected = torch.tensor([hand_logps(model, p, r) for p, r in pairs])
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    # the prompt does not count: including its tokens would give a clearly different (smaller) sum
    multi = [i for i, (p, _) in enumerate(pairs) if len(p) > 1]
    with_prompt = torch.tensor(
        [hand_logps(model, pairs[i][0][:1], pairs[i][0][1:] + pairs[i][1]) for i in multi]
    )
    assert (with_prompt < expected[multi] - 1e-3).all()


@pytest.mark.parametrize("fast", [True, False])
def test_temperature_gives_log_softmax_of_the_logits_over_it(model, pairs, pad_id, fast):
    """At T = 0.5 the log-probs are of softmax(z/T) on both paths; at T = 1 they are bit-identical to the
    call without a temperature (the logits are not divided)."""
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    sums, _ = run(model, batch, fast=fast, temperature=0.5)
    expected = torch.tensor([hand_logps(model, p, r, temperature=0.5) for p, r in pairs])
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    assert (sums - run(model, batch, fast=fast)[0]).abs().max() > 0.1  # not the T = 1 values
    assert torch.equal(run(model, batch, fast=fast, temperature=1.0)[0], run(model, batch, fast=fast)[0])


def test_padding_tokens_do_not_count(model, pairs, pad_id):
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    base, n = run(model, batch)
    padded = batch["attention_mask"] == 0
    assert padded.any()
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(padded, 7)}  # another pad token id
    changed, n2 = run(model, other)
    torch.testing.assert_close(changed, base, rtol=0, atol=1e-6)
    assert torch.equal(n, n2)
    # extra padding columns on the right change nothing either
    wide = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, 5), value=pad_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 5), value=0),
        "response_mask": torch.nn.functional.pad(batch["response_mask"], (0, 5), value=False),
    }
    widened, _ = run(model, wide)
    torch.testing.assert_close(widened, base, rtol=0, atol=1e-5)


def test_only_response_positions_are_read(model, pairs, pad_id):
    """A response token changes the result; a prompt token changes it only through the conditioning,
    and shortening the response mask to k tokens gives the sum over exactly those k tokens."""
    prompt, response = pairs[0]
    batch = pack_sequences([prompt], [response], pad_id)
    full, n = run(model, batch)
    assert int(n) == len(response)
    partial = {**batch, "response_mask": batch["response_mask"].clone()}
    partial["response_mask"][0, len(prompt) + 2 :] = False  # first 2 response tokens only
    two, n_two = run(model, partial)
    assert int(n_two) == 2
    torch.testing.assert_close(
        two, torch.tensor([hand_logps(model, prompt, response[:2])]), rtol=0, atol=1e-5
    )
    assert float(two) > float(full)  # fewer (negative) terms


def test_empty_response_gives_zero_and_length_zero(model, pairs, pad_id):
    prompts = [pairs[0][0], pairs[1][0], pairs[2][0]]
    responses = [pairs[0][1], [], pairs[2][1]]
    batch = pack_sequences(prompts, responses, pad_id)
    sums, n = run(model, batch)
    slow, _ = run(model, batch, fast=False)
    assert torch.isfinite(sums).all() and torch.isfinite(slow).all()
    assert float(sums[1]) == 0.0 and int(n[1]) == 0
    assert n.tolist() == [len(pairs[0][1]), 0, len(pairs[2][1])]
    torch.testing.assert_close(
        sums[[0, 2]],
        torch.tensor([hand_logps(model, *pairs[0]), hand_logps(model, *pairs[2])]),
        rtol=0,
        atol=1e-5,
    )
    # every response empty: no response position at all
    none = pack_sequences(prompts, [[], [], []], pad_id)
    sums0, n0 = run(model, none)
    assert sums0.tolist() == [0.0, 0.0, 0.0] and n0.tolist() == [0, 0, 0]


def test_gradient_flows_only_through_response_positions(tiny_tokenizer, pairs, pad_id):
    model = build_tiny_model(tiny_tokenizer, seed=2)
    batch = pack_sequences([p for p, _ in pairs[:2]], [r for _, r in pairs[:2]], pad_id)
    sums, _ = sequence_logps(model, *(batch[k] for k in KEYS))
    sums.sum().backward()
    head = model.get_output_embeddings().weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0


def test_score_responses_returns_input_order(model, pairs, pad_id):
    # lengths chosen so the internal length sort reorders them
    order = [3, 4, 0, 2, 1]
    prompts = [pairs[i][0] for i in order]
    responses = [pairs[i][1] for i in order]
    sums, lengths = score_responses(model, prompts, responses, pad_token_id=pad_id, batch_size=2)
    expected = torch.tensor([hand_logps(model, p, r) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    assert lengths.tolist() == [len(r) for r in responses]
    assert sums.device.type == "cpu" and sums.dtype == torch.float32 and lengths.dtype == torch.long
    # one at a time gives the same
    single, _ = score_responses(model, prompts, responses, pad_token_id=pad_id, batch_size=1)
    torch.testing.assert_close(single, sums, rtol=0, atol=1e-5)


def test_score_groups_encodes_each_prompt_once_and_keeps_input_order(model, pairs, pad_id):
    """Groups of completions after one prompt (the experiment's samples, a pair's two responses) score as the
    plain rows would, in input order, whatever the batch size."""
    prompts = [pairs[i][0] for i in (2, 0, 4)]
    groups = [[pairs[2][1], pairs[1][1], pairs[3][1]], [pairs[0][1]], [pairs[4][1], pairs[2][1]]]
    expected = torch.tensor([hand_logps(model, p, c) for p, g in zip(prompts, groups) for c in g])
    for batch_size in (1, 3, 16):
        sums, lengths = score_groups(model, prompts, groups, pad_token_id=pad_id, batch_size=batch_size)
        torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
        assert lengths.tolist() == [len(c) for g in groups for c in g]


def test_fast_path_under_lora_equals_slow(tiny_tokenizer, pairs, pad_id):
    """A PEFT-wrapped model takes the fast path through the base model with the LoRA layers in place."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(tiny_tokenizer, seed=3),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    ).eval()
    with torch.no_grad():  # non-zero adapters, so they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = pack_sequences([p for p, _ in pairs], [r for _, r in pairs], pad_id)
    fast, _ = run(model, batch)
    slow, _ = run(model, batch, fast=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    with model.disable_adapter():
        base, _ = run(model, batch)
    assert (fast - base).abs().max() > 1e-3


# --- shared prefix --------------------------------------------------------------------------------------


def _plain(model, prompts, groups, pad_id):
    flat_p = [p for p, g in zip(prompts, groups) for _ in g]
    batch = pack_sequences(flat_p, [c for g in groups for c in g], pad_id)
    return token_logps(model, *(batch[k] for k in KEYS))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_equals_the_plain_path_in_values_and_gradients(tiny_tokenizer, pad_id, attention):
    from preftune.logprobs import shared_prefix_logps

    model = build_tiny_model(tiny_tokenizer, seed=6)
    model.config._attn_implementation = attention
    prompts = [[5, 6, 7, 8], [9, 10], [11]]
    groups = [[[20, 21, 22], [23], [24, 25]], [[26, 27, 28, 29], []], [[30, 31]]]  # an empty completion too
    shared, completion, entropy = shared_prefix_logps(model, prompts, groups, pad_id, entropy=True)
    (shared * torch.linspace(0.5, 1.5, len(shared))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain, rows = _plain(model, prompts, groups, pad_id)
    (plain * torch.linspace(0.5, 1.5, len(plain))).sum().backward()
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    assert torch.equal(completion, rows)
    assert completion.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 5, 5]  # completion 4 is empty
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert entropy is not None and (entropy > 0).all()


def test_shared_prefix_encodes_the_prompt_once(tiny_tokenizer, pad_id):
    from preftune.data import pack_shared_prefix
    from preftune.logprobs import shared_prefix_logps

    packed = pack_shared_prefix([[5, 6, 7]], [[[20, 21], [22, 23, 24]]], pad_id)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 20, 21, 22, 23, 24]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # both completions continue at 3
    allowed = packed["allowed"][0]
    assert not allowed[5, 3] and not allowed[6, 4]  # the second completion never sees the first
    assert allowed[5, :3].all() and allowed[7, 5:8].all() and not allowed[2, 3]
    assert packed["source"].tolist() == [2, 3, 2, 5, 6]  # the last prompt position predicts both first tokens
    model = build_tiny_model(tiny_tokenizer, seed=6)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    shared_prefix_logps(model, [[5, 6, 7]], [[[20, 21], [22, 23, 24]]], pad_id)
    hook.remove()
    assert seen == [(1, 8)]  # 3 prompt tokens once + 5 completion tokens, not 3 + 2 and 3 + 3


def test_shared_prefix_falls_back_for_other_attention(tiny_tokenizer, pad_id, monkeypatch):
    import preftune.logprobs as logprobs

    model = build_tiny_model(tiny_tokenizer, seed=6)
    reference, _ = _plain(model, [[5, 6]], [[[7, 8], [9]]], pad_id)
    monkeypatch.setattr(logprobs, "SHARED_PREFIX_ATTENTION", ())  # as for an attention without custom masks
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    logps, completion, _ = logprobs.shared_prefix_logps(model, [[5, 6]], [[[7, 8], [9]]], pad_id)
    hook.remove()
    assert seen == [(2, 4)] and completion.tolist() == [0, 0, 1]  # the plain batch: the prompt twice
    torch.testing.assert_close(logps, reference)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chunked_head_equals_a_full_log_softmax_in_values_and_gradients(monkeypatch, temperature):
    """log_softmax((h W^T + b)/T): values, entropy and the gradients (the backward's 1/T) of the chunked head."""
    import preftune.logprobs as logprobs

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 50)  # 50 // 11 = 4 rows a chunk: several chunks
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, requires_grad=True)
    weight = torch.randn(11, 6, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    g = torch.linspace(-1, 2, 10)
    logps, entropy = logprobs._ChunkedHeadLogps.apply(hidden, weight, bias, targets, temperature)
    (logps * g).sum().backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    full = torch.log_softmax((hidden @ weight.T + bias) / temperature, -1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    (expected * g).sum().backward()
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    for a, t in zip(got, (hidden, weight, bias)):
        torch.testing.assert_close(a, t.grad)
    assert not entropy.requires_grad
    empty, _ = logprobs._ChunkedHeadLogps.apply(hidden[:0], weight, bias, targets[:0])
    assert empty.shape == (0,)
