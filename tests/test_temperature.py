"""Temperature T is part of the online policy: GRPO and PPO train on log_softmax(z/T) at the sampled tokens (π_θ,
π_old, π_ref, the entropy, the evaluation's KL), checked against a plain forward of the tiny model for the
plain and the chunked head; the sampler's own log-probs agree with the trained-on ones in fp32
(``sampling/logp_diff_*``, left padding, finished rows dropped, LoRA); the agreement metrics reduce over
processes; top_p < 1 is refused for online training."""

from __future__ import annotations

import json
import math
import textwrap
import threading

import pytest
import torch
from conftest import build_tiny_model

import preftune
from preftune.config import ConfigError
from preftune.training import train

T = 0.5


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture
def prompts(tmp_path):
    """Prompts of 1 to 8 words: different lengths, so sampling left-pads them."""
    words = "the movie was great and the acting was wonderful".split()
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(words[: 1 + i % 8])}) + "\n" for i in range(10)))
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "temperature_rewards.py").write_text(
        textwrap.dedent(
            """
            def by_ids(prompts, completions, completion_ids):
                return [None if i % 5 == 0 else float(sum(c) % 7) for i, c in enumerate(completion_ids)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("temperature_rewards", None)


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with its EOS row of the LM head along the hidden states' mean direction: completions end
    after a few tokens or run to the limit, so the sampler drops finished rows mid-batch."""
    model = build_tiny_model(tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("The movie was great and the acting")["input_ids"]])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    model.lm_head.weight.data[tiny_tokenizer.eos_token_id] = 4.5 * h / h.norm() ** 2
    path = tmp_path_factory.mktemp("eos-llama")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


SECTIONS = {
    "grpo": {"completions_per_prompt": 4, "prompts_per_batch": 2, "beta": 0.1, "updates_per_batch": 2},
    "ppo": {"prompts_per_batch": 4, "completions_per_prompt": 2, "epochs": 1, "minibatches": 2, "beta": 0.1},
}


def config(model_dir, prompts, out, method, **sections):
    raw = {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 8, "batch_size": 16, "temperature": T},
        "training": {
            "output_dir": str(out),
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "progress": False,
        },
        method: {**SECTIONS[method], "rewards": ["temperature_rewards:by_ids"], "log_completions_every": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return preftune.load_config(raw)


def rows(run, split="train"):
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def tempered(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(z/T) at each completion token and the entropy of softmax(z/T) there, (len(completion),)
    each, from one plain forward of prompt + completion (no padding, no library log-prob path)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        z = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / T  # (L, V)
    logp = torch.log_softmax(z, dim=-1)
    picked = logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("head", ["plain", "chunked"])
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_training_log_probs_are_log_softmax_over_temperature(
    tmp_path, tiny_model_dir, prompts, reward_module, monkeypatch, method, head
):
    """π_θ (trained on), its entropy, π_old, π_ref and the evaluation's π_θ and π_ref sequence log-probs all
    equal log_softmax(z/T) at the sampled tokens of a plain forward (z: the starting model's logits before the
    first update; the final model's for the evaluation after it)."""
    import importlib

    import preftune.heldout as heldout
    import preftune.logprobs as logprobs
    from preftune.training.reference import Reference

    module = importlib.import_module(f"preftune.training.{method}")
    chunked_calls = []
    if head == "chunked":  # every head call goes through the chunked log-softmax, several chunks of rows
        monkeypatch.setattr(logprobs, "CHUNKED_ABOVE", 0)
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 400)
        real_apply = logprobs._ChunkedHeadLogps.apply
        monkeypatch.setattr(
            logprobs._ChunkedHeadLogps, "apply", lambda *a: chunked_calls.append(1) or real_apply(*a)
        )
    seen: list = []
    real_micro = module.micro_batches

    def spy_micro(model, rollout, order, s, sums, **kw):
        for mb in real_micro(model, rollout, order, s, sums, **kw):
            seen.append((rollout, mb["idx"], mb["logps"].detach().clone(), mb["entropy"].detach().clone()))
            yield mb

    monkeypatch.setattr(module, "micro_batches", spy_micro)
    evaluated = {"policy": [], "ref": []}  # the held-out evaluator's (prompts, groups, sums) of each pass
    real_ratios, real_ref_groups = heldout.log_ratios, Reference.score_groups

    def spy_ratios(net, reference, prompts, groups, **kw):  # fp32: the policy's log-probs are the sampler's
        assert kw["sampled_logps"] is not None and kw["mixed_precision"] == "no"
        evaluated["policy"].append(
            (prompts, groups, torch.tensor([x for g in kw["sampled_logps"] for x in g]))
        )
        return real_ratios(net, reference, prompts, groups, **kw)

    def spy_ref_groups(self, prompts, groups, **kw):
        out = real_ref_groups(self, prompts, groups, **kw)
        evaluated["ref"].append((prompts, groups, out))
        return out

    monkeypatch.setattr(heldout, "log_ratios", spy_ratios)
    monkeypatch.setattr(Reference, "score_groups", spy_ref_groups)
    sections = {"data": {"eval_fraction": 0.2}, "training": {"max_steps": 1}}
    if method == "ppo" and head == "plain":
        sections["ppo"] = {"entropy_coef": 0.01}  # the differentiated entropy (never the chunked head)
    run = train(config(tiny_model_dir, prompts, tmp_path / "run", method, **sections), log=quiet)

    start = transformers_model(tiny_model_dir)
    assert seen and (head == "plain" or chunked_calls)
    checked = 0
    for rollout, idx, logps, entropy in seen:
        assert rollout.old_logps is not None and rollout.ref_logps is not None
        for row, i in enumerate(idx):
            completion = rollout.completion_ids[i]
            expected, expected_entropy = tempered(start, rollout.prompt_ids[i], completion)
            n = len(completion)
            for name, got in (
                ("trained", logps[row, :n]),
                ("old", rollout.old_logps[i, :n]),
                ("ref", rollout.ref_logps[i, :n]),
                ("sampler", rollout.sample_logps[i, :n]),
            ):
                torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0, msg=name)
            torch.testing.assert_close(entropy[row, :n].double(), expected_entropy, atol=2e-5, rtol=0)
            checked += 1
    assert checked >= 4
    final = transformers_model(run / "model")
    assert evaluated["policy"] and evaluated["ref"]
    for kind, model in (("policy", final), ("ref", start)):
        for prompts, groups, sums in evaluated[kind]:
            flat = [(list(p), list(c)) for p, group in zip(prompts, groups) for c in group]
            assert len(flat) == len(sums)
            for (prompt, completion), got in zip(flat, sums.tolist()):
                expected = float(tempered(model, prompt, completion)[0].sum())
                assert got == pytest.approx(expected, abs=1e-4), kind
    assert rows(run, "eval")[-1]["kl"] != 0.0  # the final policy moved (its KL is of the tempered π's)


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_sampler_and_training_log_probs_agree_in_fp32(
    tmp_path, eos_model_dir, prompts, reward_module, monkeypatch, method
):
    """|log π_sample − log π_train| ≤ 1e-4 at each batch's first pass, logged as ``sampling/logp_diff_max``, with
    left-padded prompts, finished rows dropped from the sampler's batch, rows without a reward, LoRA, T = 0.5."""
    from transformers import DynamicCache

    dropped = []
    real_select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache, "batch_select_indices", lambda self, keep: dropped.append(1) or real_select(self, keep)
    )
    lora = {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    cfg = config(eos_model_dir, prompts, tmp_path / "run", method, model=lora, training={"max_steps": 4})
    run = train(cfg, log=quiet)
    assert dropped  # the sampler compacted its batch
    lengths = [json.loads(line)["tokens"] for line in (run / "completions.jsonl").read_text().splitlines()]
    assert min(lengths) < 8 and max(lengths) == 8  # finished early, and cut at the limit
    firsts = [r for r in rows(run) if (r["step"] - 1) % 2 == 0]  # each batch serves 2 updates
    assert len(firsts) == 2
    for r in rows(run):
        assert ("sampling/logp_diff_max" in r) == (r in firsts)
    for r in firsts:
        assert 0 <= r["sampling/logp_diff_mean"] <= r["sampling/logp_diff_max"] <= 1e-4
        assert r["sampling/logp_diff_mean"] <= 1e-5
        for key in ("sampling/ratio_mean", "sampling/ratio_min", "sampling/ratio_max"):
            assert r[key] == pytest.approx(1.0, abs=1e-4), key
        assert r["sampling/ratio_min"] <= r["sampling/ratio_mean"] <= r["sampling/ratio_max"]


class _ThreadGroup:
    """A collective among threads, standing in for processes: every member's tensor, stacked."""

    def __init__(self, n: int):
        self.slots: list = [None] * n
        self.barrier = threading.Barrier(n)


class _FakeAccelerator:
    def __init__(self, group: _ThreadGroup, rank: int):
        self.group, self.rank = group, rank
        self.num_processes, self.device = len(group.slots), torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        stacked = torch.stack(self.group.slots)
        self.group.barrier.wait()
        return {"sum": stacked.sum(0), "max": stacked.max(0).values}[reduction]


def test_sampling_agreement_sums_and_max_reduces_over_processes():
    """Rank 0 compares 3 tokens, rank 1 one token (and one of its rows is not a token): the mean is the sum of
    |x| over both ranks over the 4 tokens, the maxima are the larger of the ranks'."""
    from preftune.training.online import SamplingAgreement

    train_logps = [torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), torch.tensor([[-3.0, -9.0]])]
    sample_logps = [torch.tensor([[-1.1, -1.8], [-0.5, 0.0]]), torch.tensor([[-2.0, -1.0]])]
    tokens = [torch.tensor([[True, True], [True, False]]), torch.tensor([[True, False]])]
    group, out = _ThreadGroup(2), [None, None]

    def work(rank):
        agreement = SamplingAgreement()
        agreement.add(train_logps[rank], sample_logps[rank], tokens[rank])
        out[rank] = agreement.metrics(_FakeAccelerator(group, rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    x = [0.1, -0.2, 0.0, -1.0]  # log π_train − log π_sample at the 4 tokens
    expected = {
        "sampling/logp_diff_mean": sum(abs(v) for v in x) / 4,
        "sampling/logp_diff_max": 1.0,
        "sampling/ratio_mean": sum(math.exp(v) for v in x) / 4,
        "sampling/ratio_min": math.exp(-1.0),
        "sampling/ratio_max": math.exp(0.1),
    }
    for got in out:
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_sampling_agreement_without_tokens_logs_nothing():
    from preftune.training.online import SamplingAgreement

    agreement = SamplingAgreement()
    agreement.add(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert agreement.metrics(type("Acc", (), {"num_processes": 1})()) == {}


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_top_p_below_one_is_refused_for_online_training(tmp_path, tiny_model_dir, prompts, method):
    with pytest.raises(ConfigError, match="top_p must be 1 for .*nothing renormalises them to the nucleus"):
        config(tiny_model_dir, prompts, tmp_path / "r", method, generation={"top_p": 0.9})
    config(tiny_model_dir, prompts, tmp_path / "r", method, generation={"top_p": 1.0})  # accepted


def test_a_rollout_keeps_the_samplers_log_probs_through_a_checkpoint(tmp_path):
    from preftune.training.rollout import Rollout

    rollout = Rollout(
        batch=3, prompt_index=[0], prompt_ids=[[5, 6], [5, 6]], completion_ids=[[7, 8], [9]],
        completions=["a", "b"], rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), per_function={},
        truncated=torch.tensor([False, True]), sample_logps=torch.tensor([[-0.5, -1.25, 0.0], [-2.0, 0.0, 0.0]]),
    )  # fmt: skip
    rollout.save(tmp_path, rank=1)
    loaded = Rollout.load(tmp_path, rank=1)
    assert torch.equal(loaded.sample_logps, rollout.sample_logps)
