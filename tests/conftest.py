"""Shared fixtures: a tiny tokenizer and a tiny random Llama, built in-process (no network)."""

from __future__ import annotations

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The movie was great and the acting was wonderful.",
    "The film was terrible, boring and far too long.",
    "I loved the story, the music and the ending.",
    "What a waste of time; the plot made no sense.",
    "Hello world. A good day for a review of a bad film.",
    "user assistant system: question answer yes no maybe",
] * 4


def build_tiny_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer with ChatML-style special tokens (like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if add_bos:
        bos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session", autouse=True)
def _own_reference_cache(tmp_path_factory):
    """Reference log-probs cached across runs go to a folder of this test session, not the user's cache."""
    import os

    previous = os.environ.get("PREFTUNE_REF_CACHE")
    os.environ["PREFTUNE_REF_CACHE"] = str(tmp_path_factory.mktemp("ref-cache"))
    yield
    if previous is None:
        os.environ.pop("PREFTUNE_REF_CACHE", None)
    else:
        os.environ["PREFTUNE_REF_CACHE"] = previous


@pytest.fixture(autouse=True)
def _own_token_cache(tmp_path_factory, monkeypatch):
    """Tokenised data cached across runs (data.token_cache) goes to a folder of this test (beside its tmp_path,
    not in it): runs within a test share it (a resumed run maps its first run's examples), tests never see
    each other's."""
    monkeypatch.setenv("PREFTUNE_TOKEN_CACHE", str(tmp_path_factory.mktemp("token-cache")))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine are ~100x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A folder with a tiny random Llama and its tokenizer, loadable by from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path
