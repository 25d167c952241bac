"""Building blocks of the controlled experiment: prompts, rewards, pairs, metrics, stages,
report and sampling. Known values are worked out in the comments."""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from preftune import metrics, rewards
from preftune.experiments.pairs import build_pairs, label_by_median
from preftune.experiments.prompts import load_prompts
from preftune.experiments.report import (
    format_table,
    plot_frontier,
    plot_training_curves,
    write_report_md,
    write_results,
)
from preftune.experiments.stages import fingerprint, read_stage, run_stage
from preftune.files import read_jsonl, write_jsonl_atomic
from preftune.sampling import Samples, sample_responses

# ---- prompts -------------------------------------------------------------------------


def test_builtin_prompts_counts_disjoint_and_neutral():
    train, heldout = load_prompts(None, "train"), load_prompts(None, "heldout")
    assert len(train) >= 230 and len(heldout) >= 75 and len(train) + len(heldout) >= 320
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    evaluative = re.compile(
        r"\b(great|awful|lov\w*|boring|terrible|best|worst|bad|good|favou?rite|amazing)\b", re.I
    )
    for p in train + heldout:
        assert 4 <= len(p.split()) <= 14, p
        assert not evaluative.search(p), p


def test_user_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\n\n  First opening line  \nSecond one\n#skip\n", encoding="utf-8")
    assert load_prompts(str(path), "train") == ["First opening line", "Second one"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        load_prompts(empty, "train")
    with pytest.raises(ValueError, match="split"):
        load_prompts(None, "test")  # type: ignore[arg-type]


# ---- rewards -------------------------------------------------------------------------


def test_vader_reward_mapping():
    pos, neg, neutral, empty = rewards.vader_reward(
        ["p"] * 4,
        [
            "The movie was great and the acting was wonderful.",
            "It was awful, boring and far too long.",
            "The film starts at nine.",
            "",
        ],
    )
    assert 1.0 < pos < 2.0 and 0.0 < neg < 1.0
    assert neutral == 1.0 and empty == 1.0
    # VADER rounds compound to 4 decimals, so 200 x "great" gives exactly 1.0; we clip.
    (very_pos,) = rewards.vader_reward(["p"], ["great " * 200])
    assert very_pos == pytest.approx(1.9999) and very_pos < 2.0
    with pytest.raises(ValueError, match="pair up"):
        rewards.vader_reward(["a"], ["x", "y"])


def test_load_reward_vader_and_module(tmp_path, monkeypatch):
    assert load_and_call("vader", ["p"], [""]) == [1.0]
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length(prompts, responses):
                return [len(r) for r in responses]
            def short(prompts, responses):
                return [1.0]
            def nan(prompts, responses):
                return [0.0, float("nan")]
            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_and_call("my_rewards:length", ["a", "b"], ["xy", ""]) == [2.0, 0.0]
    with pytest.raises(ValueError, match=r"my_rewards:short.*1 scores for 2"):
        load_and_call("my_rewards:short", ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"my_rewards:nan.*index 1"):
        load_and_call("my_rewards:nan", ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="not callable"):
        rewards.load_reward("my_rewards:NOT_CALLABLE")
    with pytest.raises(ValueError, match="no attribute"):
        rewards.load_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward spec"):
        rewards.load_reward("sentiment")


def test_two_rewards_of_one_name_are_summed_and_keyed_apart():
    """Two ``regex`` rewards with different patterns: Σ w_k r_k uses each one's own values (not the last's
    for both), and their per-function values are ``regex`` and ``regex#2``."""
    fs = [
        rewards.load_reward({"name": "regex", "pattern": "good"}),
        rewards.load_reward({"name": "regex", "pattern": "bad", "weight": -2.0}),
        rewards.load_reward({"name": "length", "target": 2, "weight": 0.5}),
    ]
    totals, per = rewards.score_all(fs, ["p", "p"], ["good film", "bad film"], [[1, 2], [3, 4]], {})
    assert (
        per["regex"] == [1.0, 0.0]
        and per["regex#2"] == [0.0, 1.0]
        and list(per) == ["regex", "regex#2", "length"]
    )
    length = per["length"]
    assert totals == pytest.approx([1.0 + 0.5 * length[0], -2.0 + 0.5 * length[1]])


def load_and_call(spec, prompts, responses):
    return rewards.load_reward(spec)(prompts, responses)


def test_reward_model_scorer(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    fn = rewards.load_reward(f"reward_model:{tmp_path}")
    assert fn.fn.device is None  # placed on the first call, once the run's accelerator exists
    prompts = ["The movie was", "Hello world."]
    responses = [" great.", " a waste of time; the plot made no sense."]
    batched = fn(prompts, responses)
    alone = [fn([p], [r])[0] for p, r in zip(prompts, responses)]
    assert len(batched) == 2 and all(math.isfinite(v) for v in batched)
    assert batched == pytest.approx(alone, abs=1e-5)  # right padding does not change a score
    with pytest.raises(ValueError, match="not found"):
        rewards.load_reward(f"reward_model:{tmp_path / 'nope'}")


def test_reward_model_scorer_takes_the_process_device_on_first_call(tmp_path, tiny_tokenizer, monkeypatch):
    """Built before the accelerator exists (config checks), the scorer asks for this process's device only
    when it first scores: under several GPUs each rank then scores on its own device, not on cuda:0."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    asked = []

    def process_device():
        asked.append(True)
        return torch.device("cpu")

    monkeypatch.setattr(rewards, "process_device", process_device)
    fn = rewards.load_reward(f"reward_model:{tmp_path}")
    assert asked == []
    fn(["The movie was"], [" great."])
    fn(["The movie was"], [" bad."])
    assert asked == [True] and fn.fn.device == torch.device("cpu")
    explicit = rewards.RewardModelScorer(tmp_path, device="cpu")
    explicit(["a"], ["b"])
    assert len(asked) == 1 and explicit.device == torch.device("cpu")


# ---- pairs ---------------------------------------------------------------------------

RECORDS = [
    # scores 3, 1, 3, 2: pairs (0,1) (0,3) (1,2) (2,3) (1,3) differ, (0,2) ties.
    {"prompt": "p0", "responses": ["a", "b", "c", "d"], "scores": [3.0, 1.0, 3.0, 2.0]},
    # all tie: no pair, 3 ties in "all" mode.
    {"prompt": "p1", "responses": ["e", "f", "g"], "scores": [1.0, 1.0, 1.0]},
    # "h" twice: the repeat is dropped, leaving h(0.5) vs i(1.5): one pair.
    {"prompt": "p2", "responses": ["h", "h", "i"], "scores": [0.5, 0.5, 1.5]},
]


def test_build_pairs_all():
    rows, stats = build_pairs(RECORDS, "all")
    assert stats == {
        "prompts": 3,
        "pairs": 6,
        "ties_dropped": 4,
        "prompts_without_pair": 1,
        "duplicates_dropped": 1,
    }
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("a", "b"),
        ("a", "d"),
        ("c", "b"),
        ("d", "b"),
        ("c", "d"),
        ("i", "h"),
    ]
    for r in rows:
        assert r["score_chosen"] > r["score_rejected"] and r["chosen"] != r["rejected"]
        assert set(r) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert rows[0] == {
        "prompt": "p0",
        "chosen": "a",
        "rejected": "b",
        "score_chosen": 3.0,
        "score_rejected": 1.0,
    }


def test_build_pairs_best_vs_worst():
    rows, stats = build_pairs(RECORDS, "best_vs_worst")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p0", "a", "b"), ("p2", "i", "h")]
    assert stats == {
        "prompts": 3,
        "pairs": 2,
        "ties_dropped": 1,
        "prompts_without_pair": 1,
        "duplicates_dropped": 1,
    }
    with pytest.raises(ValueError, match="unknown pair mode"):
        build_pairs(RECORDS, "random")
    with pytest.raises(ValueError, match="record 0"):
        build_pairs([{"prompt": "x", "responses": ["a"], "scores": [1.0, 2.0]}])


def test_kto_records_labelled_by_each_prompts_median_reward():
    records = [
        {"prompt": "p0", "responses": ["a", "b", "c", "d"], "scores": [1.0, 2.0, 3.0, 4.0]},  # median 2.5
        {"prompt": "p1", "responses": ["e", "f", "g"], "scores": [3.0, 1.0, 2.0]},  # median 2: g left out
        {"prompt": "p2", "responses": ["h", "h", "i"], "scores": [5.0, 5.0, 0.0]},  # h once: median 2.5
        {"prompt": "p3", "responses": ["j", "k"], "scores": [1.0, 1.0]},  # a tie: nothing
    ]
    rows, stats = label_by_median(records)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("p0", "a", False),
        ("p0", "b", False),
        ("p0", "c", True),
        ("p0", "d", True),
        ("p1", "e", True),
        ("p1", "f", False),
        ("p2", "h", True),
        ("p2", "i", False),
    ]
    assert [r["median"] for r in rows] == [2.5] * 4 + [2.0] * 2 + [2.5] * 2
    assert stats == {
        "prompts": 4,
        "desirable": 4,
        "undesirable": 4,
        "at_median_dropped": 3,  # g, j, k
        "duplicates_dropped": 1,
    }


def test_write_jsonl_atomic_roundtrip(tmp_path):
    rows, _ = build_pairs(RECORDS)
    path = write_jsonl_atomic(tmp_path / "sub" / "pairs.jsonl", rows)
    assert read_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary files left


# ---- metrics -------------------------------------------------------------------------


def test_mean_and_se_known_values():
    # [1, 2, 3, 4]: mean 2.5, sample variance 5/3, se = sqrt(5/3) / 2 = 0.645497
    assert metrics.mean_and_se([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    assert metrics.mean_and_se([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        metrics.mean_and_se([])


def test_sequence_kl_known_values():
    # d = policy - ref = [1, -1, 3, 1]: mean 1.0, sample var = (0 + 4 + 4 + 0) / 3 = 8/3, se = sqrt(8/3)/2
    policy = torch.tensor([-10.0, -12.0, -5.0, -20.0])
    ref = [-11.0, -11.0, -8.0, -21.0]
    mean, se = metrics.sequence_kl(policy, ref)
    assert mean == pytest.approx(1.0) and se == pytest.approx(math.sqrt(8 / 3) / 2)
    assert metrics.sequence_kl(ref, ref) == (0.0, 0.0)
    assert metrics.sequence_kl([-1.0, -2.0], [-1.5, -1.0])[0] == pytest.approx(-0.25)  # noise can go negative
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.sequence_kl([1.0], [1.0, 2.0])


def test_win_rate_with_ties():
    # wins at 0 and 3, tie at 1, loss at 2: (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert metrics.win_rate([2.0, 1.0, 0.5, 1.2], [1.0, 1.0, 1.0, 1.1]) == pytest.approx(0.625)
    assert metrics.win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_avg_logp_agreement():
    # per-token: (-2 vs -3) agree; (-3 vs -2) disagree; (-1 vs -1) tie = disagree;
    # lengths 0 count as 1: (-0.5 vs -2) agree  -> 2 / 4
    value = metrics.avg_logp_agreement(
        [-4.0, -6.0, -3.0, -0.5], [2, 2, 3, 0], [-9.0, -4.0, -1.0, -4.0], [3, 2, 1, 2]
    )
    assert value == 0.5


# ---- stages --------------------------------------------------------------------------


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint({"a": 1}))


def test_run_stage_caches_and_reruns(tmp_path):
    calls, logs = [], []

    def fn(out):
        calls.append(out)
        (out / "data.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    stage_dir, ran = run_stage(tmp_path, "gen", {"k": 4}, fn, log=logs.append)
    assert ran and stage_dir == tmp_path / "gen" and calls[0].name == ".gen.tmp"
    assert (stage_dir / "data.txt").read_text() == "1"
    info = read_stage(tmp_path, "gen")
    assert (
        info["fingerprint"] == fingerprint({"k": 4})
        and info["summary"] == {"n": 1}
        and info["inputs"] == {"k": 4}
    )

    _, ran = run_stage(tmp_path, "gen", {"k": 4}, fn, log=logs.append)
    assert not ran and len(calls) == 1 and "[skip] gen (cached)" in logs

    _, ran = run_stage(tmp_path, "gen", {"k": 8}, fn, log=logs.append)
    assert ran and (stage_dir / "data.txt").read_text() == "2"
    assert read_stage(tmp_path, "gen")["fingerprint"] == fingerprint({"k": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no tmp/old folders left


def test_run_stage_failure_leaves_nothing(tmp_path):
    def boom(out):
        (out / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(tmp_path, "score", {"x": 1}, boom, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        read_stage(tmp_path, "score")

    # a failing rerun with new inputs keeps the old result, which no longer matches
    run_stage(tmp_path, "score", {"x": 1}, lambda out: None, log=lambda _: None)
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "score", {"x": 2}, boom, log=lambda _: None)
    assert read_stage(tmp_path, "score")["inputs"] == {"x": 1}
    _, ran = run_stage(tmp_path, "score", {"x": 2}, lambda out: None, log=lambda _: None)
    assert ran and sorted(p.name for p in tmp_path.iterdir()) == ["score"]


# ---- report --------------------------------------------------------------------------

ROWS = [
    {
        "method": "base",
        "beta": None,
        "reward_mean": 1.10,
        "reward_se": 0.02,
        "kl_mean": 0.0,
        "kl_se": 0.0,
        "win_rate": 0.5,
        "logp_agreement": None,
        "n_samples": 80,
    },
    {
        "method": "dpo",
        "beta": 0.5,
        "reward_mean": 1.40,
        "reward_se": 0.03,
        "kl_mean": 2.0,
        "kl_se": 0.2,
        "win_rate": 0.70,
        "logp_agreement": 0.52,
        "n_samples": 80,
        "steps": 100,
    },
    {
        "method": "dpo",
        "beta": 0.1,
        "reward_mean": 1.60,
        "reward_se": 0.03,
        "kl_mean": 6.0,
        "kl_se": 0.4,
        "win_rate": 0.80,
        "logp_agreement": 0.55,
        "n_samples": 80,
        "steps": 100,
    },
    {
        "method": "simpo",
        "beta": 2.0,
        "reward_mean": 1.50,
        "reward_se": 0.03,
        "kl_mean": 4.0,
        "kl_se": float("nan"),
        "win_rate": 0.75,
        "logp_agreement": 0.60,
        "n_samples": 80,
    },
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_outputs(tmp_path):
    csv_path, json_path = write_results(tmp_path, ROWS)
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == [
        "method",
        "beta",
        "reward_mean",
        "reward_se",
        "kl_mean",
        "kl_se",
        "win_rate",
        "logp_agreement",
        "n_samples",
        "steps",
    ]
    assert body[0][:2] == ["base", ""] and len(body) == 4
    loaded = json.loads(json_path.read_text())
    assert loaded[0]["beta"] is None and loaded[3]["kl_se"] is None  # NaN -> null

    frontier = plot_frontier(ROWS, tmp_path / "frontier.png")
    assert frontier.read_bytes()[:8] == PNG_MAGIC

    metrics_file = tmp_path / "dpo_metrics.jsonl"
    write_jsonl_atomic(
        metrics_file,
        [
            {"step": 1, "split": "train", "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.5},
            {"step": 2, "split": "train", "loss": 0.60, "rewards/margins": 0.3, "rewards/accuracies": 0.7},
            {"step": 2, "split": "eval", "loss": 0.65},
        ],
    )
    curves = plot_training_curves({"dpo β=0.1": metrics_file}, tmp_path / "curves.png")
    assert curves.read_bytes()[:8] == PNG_MAGIC

    table = format_table(ROWS)
    lines = table.splitlines()
    assert len(lines) == 6 and lines[0].startswith("method") and "1.400 ± 0.030" in table
    assert "6.000 ± 0.400" in table and "4.000 ± -" in table

    md = write_report_md(
        tmp_path, ROWS, {"model": "tiny", "betas": [0.1, 0.5]}, [str(frontier), "curves.png"]
    )
    text = md.read_text()
    assert "| dpo | 0.1 |" in text and "![frontier](frontier.png)" in text and "![curves](curves.png)" in text
    assert "**betas**: [0.1, 0.5]" in text

    with pytest.raises(ValueError, match="missing keys"):
        write_results(tmp_path, [{"method": "dpo"}])


# ---- sampling ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_heavy_model(tiny_tokenizer):
    """The tiny random Llama with +3.5 added to the EOS logit, so samples often stop early."""
    model = build_tiny_model(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id

    def add_eos_bias(module, args, logits):
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[eos] = 3.5
        return logits + bias

    model.lm_head.register_forward_hook(add_eos_bias)
    return model


PROMPTS = ["The movie was", "Hello world. A good day for a review", "I loved the story"]


def test_sample_responses_shapes_and_eos(eos_heavy_model, tiny_tokenizer):
    tok = tiny_tokenizer
    eos_heavy_model.train()
    saved_config = eos_heavy_model.generation_config
    s = sample_responses(
        eos_heavy_model, tok, PROMPTS, k=4, max_new_tokens=10, batch_size=5, seed=3, progress=False
    )
    assert eos_heavy_model.training and eos_heavy_model.generation_config is saved_config  # restored
    assert isinstance(s, Samples) and s.prompts == PROMPTS and s.k == 4
    assert s.prompt_ids == [tok(p)["input_ids"] for p in PROMPTS]
    assert [len(r) for r in s.response_ids] == [4, 4, 4] and [len(r) for r in s.responses] == [4, 4, 4]
    flat = [ids for group in s.response_ids for ids in group]
    assert any(ids and ids[-1] == tok.eos_token_id for ids in flat)  # the bias makes EOS common
    for ids, text in zip(flat, [t for group in s.responses for t in group]):
        assert 1 <= len(ids) <= 10
        assert tok.eos_token_id not in ids[:-1]  # cut right after the first EOS
        if len(ids) < 10:
            assert ids[-1] == tok.eos_token_id  # ended early only by generating EOS
        assert text == tok.decode(ids, skip_special_tokens=True)
    prompts, responses = s.flat()
    assert prompts == [p for p in PROMPTS for _ in range(4)] and len(responses) == 12
    records = s.records([1.0] * 12)
    assert records[1]["prompt"] == PROMPTS[1] and records[1]["responses"] == s.responses[1]

    again = sample_responses(
        eos_heavy_model, tok, PROMPTS, k=4, max_new_tokens=10, batch_size=5, seed=3, progress=False
    )
    assert again.response_ids == s.response_ids
    other = sample_responses(
        eos_heavy_model, tok, PROMPTS, k=4, max_new_tokens=10, batch_size=5, seed=4, progress=False
    )
    assert other.response_ids != s.response_ids


def test_greedy_is_unchanged_by_left_padding(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    alone = sample_responses(
        model, tiny_tokenizer, ["The movie was"], k=1, max_new_tokens=6, temperature=0, progress=False
    )
    batched = sample_responses(
        model,
        tiny_tokenizer,
        ["Hello world. A good day for a review of a bad film.", "The movie was"],
        k=2,
        max_new_tokens=6,
        temperature=0,
        progress=False,
    )
    assert batched.response_ids[1] == [alone.response_ids[0][0]] * 2


def test_prompt_bos_not_doubled():
    tok = build_tiny_tokenizer(add_bos=True)
    model = build_tiny_model(tok)
    s = sample_responses(
        model, tok, ["<|endoftext|>The movie was", "The movie was"], k=1, max_new_tokens=2, progress=False
    )
    assert s.prompt_ids[0] == s.prompt_ids[1] and s.prompt_ids[0][0] == tok.bos_token_id
    assert s.prompt_ids[0][1] != tok.bos_token_id


def test_cluster_standard_error_known_values():
    # clustered [a, a, b, b]: deviations -1.5 -0.5 | 0.5 1.5 -> cluster sums -2, 2; se² = 2/1 * 8 / 16 = 1
    assert metrics.mean_and_se([1, 2, 3, 4], ["a", "a", "b", "b"]) == pytest.approx((2.5, 1.0))
    # one value per cluster is the plain formula
    assert metrics.mean_and_se([1, 2, 3, 4], [0, 1, 2, 3]) == pytest.approx(metrics.mean_and_se([1, 2, 3, 4]))
    # correlated samples of one prompt: the clustered se is larger than the naive one
    values, clusters = [1.0, 1.1, 3.0, 3.1, 2.0, 2.1], [0, 0, 1, 1, 2, 2]
    assert metrics.mean_and_se(values, clusters)[1] > 1.3 * metrics.mean_and_se(values)[1]
    assert metrics.mean_and_se([5.0, 6.0], ["x", "x"]) == (5.5, 0.0)
    rate, se = metrics.win_rate_and_se([2, 1, 0.5, 3], [1, 1, 1, 1], [0, 0, 1, 1])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4) and se > 0


def test_sampling_streams_never_share_batch_seeds():
    from preftune.sampling import derive_seed

    train = {derive_seed(derive_seed(0, "samples"), b) for b in range(1000)}
    evaluation = {derive_seed(derive_seed(0, "eval"), b) for b in range(1000)}
    assert len(train) == len(evaluation) == 1000 and not train & evaluation
    assert derive_seed(0, "samples") == derive_seed(0, "samples") != derive_seed(1, "samples")
