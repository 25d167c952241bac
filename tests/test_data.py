"""The data layer: load, validate, split, tokenise, collate. All offline, exact values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_tokenizer

from preftune.data import (
    DataError,
    PairExample,
    TokenizeStats,
    collate_pairs,
    collate_prompts,
    load_rows,
    prompt_ids,
    response_ids,
    split_implicit_prompt,
    split_rows,
    tokenize_pair,
    tokenize_rows,
    validate_rows,
)

EOS = 2  # <|im_end|> in the tiny tokenizer
BOS = 0  # <|endoftext|>


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def enc(tiny_tokenizer):
    """Plain token ids of a text, no special tokens added: the building block of expected ids."""
    return lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


# --- loading -------------------------------------------------------------------------------------------


def test_jsonl_sources_count_blank_lines_and_drop_other_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "p1", "chosen": "c1", "rejected": "r1", "id": 7}\n'
        "\n"
        '{"prompt": "p2", "chosen": "c2", "rejected": "r2", "score_chosen": 1, "score_rejected": 0.5}\n',
        encoding="utf-8",
    )
    assert load_rows(path) == [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "_source": f"{path} line 1"},
        {
            "prompt": "p2",
            "chosen": "c2",
            "rejected": "r2",
            "score_chosen": 1,
            "score_rejected": 0.5,
            "_source": f"{path} line 3",
        },
    ]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: malformed JSON"):
        load_rows(path)


def test_jsonl_record_must_be_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl line 1: expected a JSON object, got list"):
        load_rows(path)


def test_json_list_uses_record_numbers(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(
        json.dumps(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
        ),
        encoding="utf-8",
    )
    assert load_rows(path) == [
        {"prompt": "a", "chosen": "b", "rejected": "c", "_source": f"{path} record 0"},
        {"prompt": "d", "chosen": "e", "rejected": "f", "_source": f"{path} record 1"},
    ]


def test_json_file_holding_json_lines_uses_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "pairs.json", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    assert [r["_source"] for r in load_rows(path)] == [f"{path} line 1", f"{path} line 2"]


def test_json_list_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json line 3: malformed JSON"):
        load_rows(path)


def test_csv_lines_count_the_header_and_scores_become_floats(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected,score_chosen,score_rejected,note\n"
        "p1,c1,r1,1.5,-2,x\n"
        '"p2, with comma","c2\nover two lines",r2,,,y\n'
        "p3,c3,r3,3,4,z\n",
        encoding="utf-8",
    )
    assert load_rows(path) == [
        {
            "prompt": "p1",
            "chosen": "c1",
            "rejected": "r1",
            "score_chosen": 1.5,
            "score_rejected": -2.0,
            "_source": f"{path} line 2",
        },
        {
            "prompt": "p2, with comma",
            "chosen": "c2\nover two lines",
            "rejected": "r2",
            "_source": f"{path} line 3",
        },
        {
            "prompt": "p3",
            "chosen": "c3",
            "rejected": "r3",
            "score_chosen": 3.0,
            "score_rejected": 4.0,
            "_source": f"{path} line 5",
        },
    ]


def test_csv_bad_number_names_file_line_and_field(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("prompt,chosen,rejected,margin\np,c,r,1\np,c,r,lots\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"scores\.csv line 3: field 'margin': not a number: 'lots'"):
        load_rows(path)


def test_csv_wrong_cell_count(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("prompt,chosen,rejected\np,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"short\.csv line 2: expected 3 cells"):
        load_rows(path)


def test_parquet_records_nulls_and_messages(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.parquet"
    pd.DataFrame(
        {
            "prompt": [[user("hi")], [user("yo")]],
            "chosen": [[assistant("good")], [assistant("fine")]],
            "rejected": [[assistant("bad")], [assistant("poor")]],
            "margin": [0.5, None],
        }
    ).to_parquet(path)
    assert load_rows(path) == [
        {
            "prompt": [user("hi")],
            "chosen": [assistant("good")],
            "rejected": [assistant("bad")],
            "margin": 0.5,
            "_source": f"{path} record 0",
        },
        {
            "prompt": [user("yo")],
            "chosen": [assistant("fine")],
            "rejected": [assistant("poor")],
            "_source": f"{path} record 1",
        },
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    records = [{"question": "q", "good": "g", "bad": "b"}]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    Dataset.from_list(records).save_to_disk(tmp_path / "ds")
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records * 2)}).save_to_disk(
        tmp_path / "dd"
    )

    ds = tmp_path / "ds"
    assert load_rows(ds, columns=columns) == [
        {"prompt": "q", "chosen": "g", "rejected": "b", "_source": f"{ds} record 0"}
    ]
    dd = tmp_path / "dd"
    assert [r["_source"] for r in load_rows(dd, columns=columns, split="test")] == [
        f"{dd} [test] record 0",
        f"{dd} [test] record 1",
    ]
    with pytest.raises(DataError, match=r"dd: no split 'validation'; the splits are \['train', 'test'\]"):
        load_rows(dd, columns=columns, split="validation")


def test_column_mapping_renames_and_keeps_only_our_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"question": "q", "a": "x", "b": "y", "chosen": "ignored", "sa": 2, "sb": 1, "extra": 0}],
    )
    columns = {
        "prompt": "question",
        "chosen": "a",
        "rejected": "b",
        "score_chosen": "sa",
        "score_rejected": "sb",
    }
    assert load_rows(path, columns=columns) == [
        {
            "prompt": "q",
            "chosen": "x",
            "rejected": "y",
            "score_chosen": 2,
            "score_rejected": 1,
            "_source": f"{path} line 1",
        }
    ]


def test_column_mapping_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.csv: column 'answer_a' \(mapped to field 'chosen'\) not found"):
        load_rows(path, columns={"chosen": "answer_a"})
    with pytest.raises(DataError, match=r"data\.columns: unknown field\(s\) \['answer'\]"):
        load_rows(path, columns={"answer": "chosen"})
    # Identity mappings (the config's defaults) do not require optional columns to exist.
    identity = {f: f for f in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin")}
    assert len(load_rows(path, columns=identity)) == 1


def test_missing_path_and_unsupported_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/missing\.jsonl: file not found"):
        load_rows("data/missing.jsonl")
    with pytest.raises(DataError, match=r"nothing-here: file not found"):
        load_rows("nothing-here")
    (tmp_path / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.md: unsupported file type '\.md'"):
        load_rows("notes.md")


def test_hub_id_goes_to_load_dataset_and_failures_mention_the_network(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_rows("someone/prefs", split="test") == [
        {"prompt": "p", "chosen": "c", "rejected": "r", "_source": "someone/prefs [test] record 0"}
    ]
    assert calls == [("someone/prefs", "test")]

    def offline(name, split):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"someone/prefs: .*need network access.*no route to host"):
        load_rows("someone/prefs")


# --- validation ----------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize(
    ("record", "kwargs", "expected"),
    [
        ({"prompt": "p", "rejected": "r"}, {}, "field 'chosen': missing"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, {}, "field 'chosen': must be a non-empty string"),
        ({"prompt": "p", "chosen": "c", "rejected": "  "}, {}, "field 'rejected': empty text"),
        ({"prompt": "p", "chosen": [], "rejected": "r"}, {}, "field 'chosen': empty list of messages"),
        ({"chosen": "c", "rejected": "r"}, {}, "field 'prompt': missing"),
        (
            {"prompt": "p", "chosen": [assistant("c")], "rejected": "r"},
            {},
            "field 'chosen': is a list of messages but 'prompt' is a string",
        ),
        (
            {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": "r"},
            {},
            "field 'rejected': is a string but 'prompt' is a list of messages",
        ),
        (
            {
                "prompt": [{**user("p"), "name": "x"}],
                "chosen": [assistant("c")],
                "rejected": [assistant("r")],
            },
            {},
            "field 'prompt': message 0: unknown key(s) ['name']",
        ),
        (
            {
                "prompt": [user("p"), {"role": "user", "content": 3}],
                "chosen": [assistant("c")],
                "rejected": [assistant("r")],
            },
            {},
            "field 'prompt': message 1: 'content' must be a string, got int",
        ),
        (
            {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": ["r"]},
            {},
            "field 'rejected': message 0: must be an object",
        ),
        (
            {"prompt": [user("p")], "chosen": [user("c")], "rejected": [assistant("r")]},
            {},
            "field 'chosen': the last message must have role 'assistant', not 'user'",
        ),
        ({**GOOD, "score_chosen": "high", "score_rejected": 0}, {}, "field 'score_chosen': must be a number"),
        ({**GOOD, "margin": float("nan")}, {}, "field 'margin': must be finite, got nan"),
        ({**GOOD, "margin": True}, {}, "field 'margin': must be a number, got bool"),
        ({**GOOD, "score_chosen": 1.0}, {"require_scores": True}, "field 'score_rejected': missing"),
        (GOOD, {"require_margin": True}, "field 'margin': missing"),
        (
            {"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("r")]},
            {},
            "field 'prompt': missing, and 'chosen' and 'rejected' share no prompt messages",
        ),
    ],
)
def test_validation_errors_name_file_line_and_field(tmp_path, record, kwargs, expected):
    first = {**GOOD, "score_chosen": 1, "score_rejected": 0, "margin": 1}  # valid under every kwargs
    path = write_jsonl(tmp_path / "rows.jsonl", [first, record])
    with pytest.raises(DataError) as info:
        validate_rows(load_rows(path), **kwargs)
    message = str(info.value)
    assert f"rows.jsonl line 2: {expected}" in message
    assert "line 1" not in message


def test_validation_accepts_every_format():
    rows = [
        {**GOOD, "_source": "a line 1"},
        {**GOOD, "score_chosen": 1, "score_rejected": 0.5, "margin": 2.0, "_source": "a line 2"},
        {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")], "_source": "b"},
        {"chosen": [user("p"), assistant("c")], "rejected": [user("p"), assistant("r")], "_source": "c"},
    ]
    validate_rows(rows)
    validate_rows(rows[1:2], require_scores=True, require_margin=True)


def test_validation_lists_at_most_max_errors():
    rows = [{"prompt": "p", "chosen": "", "rejected": "r", "_source": f"f line {i}"} for i in range(1, 16)]
    with pytest.raises(DataError) as info:
        validate_rows(rows, max_errors=3)
    assert str(info.value) == (
        "15 problem(s) in 15 row(s):\n"
        "  f line 1: field 'chosen': empty text\n"
        "  f line 2: field 'chosen': empty text\n"
        "  f line 3: field 'chosen': empty text\n"
        "  ... and 12 more"
    )


# --- splitting -----------------------------------------------------------------------------------------


def test_split_rows_is_deterministic_and_sized():
    rows = [{"i": i} for i in range(10)]
    train, evaluation = split_rows(rows, eval_fraction=0.2, seed=3)
    assert (len(train), len(evaluation)) == (8, 2)
    assert split_rows(rows, eval_fraction=0.2, seed=3) == (train, evaluation)
    assert sorted(r["i"] for r in train + evaluation) == list(range(10))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # original order kept
    other = [split_rows(rows, eval_fraction=0.2, seed=s)[1] for s in range(5)]
    assert len({tuple(r["i"] for r in e) for e in other}) > 1  # the seed matters

    assert split_rows(rows, eval_fraction=0.0, seed=0) == (rows, [])
    assert [len(part) for part in split_rows(rows[:3], eval_fraction=0.1, seed=0)] == [2, 1]
    assert [len(part) for part in split_rows(rows[:1], eval_fraction=0.5, seed=0)] == [1, 0]
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_rows(rows, eval_fraction=1.0, seed=0)


# --- tokenisation --------------------------------------------------------------------------------------


def test_response_ids_end_with_exactly_one_eos(tiny_tokenizer, enc):
    assert response_ids(tiny_tokenizer, "great") == enc("great") + [EOS]
    assert response_ids(tiny_tokenizer, "great<|im_end|>") == enc("great") + [EOS]


def test_standard_pair(tiny_tokenizer, enc):
    row = {
        "prompt": "Hello world.",
        "chosen": "great",
        "rejected": "bad",
        "score_chosen": 2,
        "score_rejected": 1,
        "margin": 1,
        "_source": "f line 4",
    }
    example = tokenize_pair(row, tiny_tokenizer, max_length=64, max_prompt_length=32, index=5)
    assert example == PairExample(
        index=5,
        prompt_ids=tuple(enc("Hello world.")),
        chosen_ids=tuple(enc("great") + [EOS]),
        rejected_ids=tuple(enc("bad") + [EOS]),
        score_chosen=2.0,
        score_rejected=1.0,
        margin=1.0,
        source="f line 4",
        truncated=False,
    )
    assert isinstance(example.score_chosen, float)


def test_bos_is_added_once_never_twice(enc):
    tokenizer = build_tiny_tokenizer(add_bos=True)
    assert prompt_ids(tokenizer, "Hello world.") == [BOS] + enc("Hello world.")
    assert prompt_ids(tokenizer, "<|endoftext|>Hello world.") == [BOS] + enc("Hello world.")
    row = {"prompt": "<|endoftext|>Hello world.", "chosen": "great", "rejected": "bad"}
    example = tokenize_pair(row, tokenizer, max_length=64, max_prompt_length=32, index=0)
    assert example.prompt_ids == (BOS, *enc("Hello world."))
    assert example.chosen_ids == (*enc("great"), EOS)  # no BOS inside responses


CHAT_PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_conversational_pair_matches_the_standard_pair(tiny_tokenizer, enc):
    conversational = {
        "prompt": [user("Hello")],
        "chosen": [assistant("great")],
        "rejected": [assistant("bad")],
    }
    standard = {"prompt": CHAT_PROMPT, "chosen": "great", "rejected": "bad"}
    kw = {"max_length": 64, "max_prompt_length": 32, "index": 0}
    a = tokenize_pair(conversational, tiny_tokenizer, **kw)
    b = tokenize_pair(standard, tiny_tokenizer, **kw)
    assert a == b
    # The template's newline after <|im_end|> is not part of the response.
    assert a.prompt_ids == tuple(enc(CHAT_PROMPT))
    assert a.chosen_ids == (*enc("great"), EOS)
    assert a.rejected_ids == (*enc("bad"), EOS)
    assert prompt_ids(tiny_tokenizer, [user("Hello")]) == enc(CHAT_PROMPT)


def test_multi_turn_prompt(tiny_tokenizer, enc):
    prompt = [{"role": "system", "content": "Be brief"}, user("Hi"), assistant("Hello"), user("A film?")]
    row = {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    example = tokenize_pair(row, tiny_tokenizer, max_length=128, max_prompt_length=100, index=0)
    rendered = (
        "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nA film?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.prompt_ids == tuple(enc(rendered))
    assert example.chosen_ids == (*enc("yes"), EOS)
    assert example.rejected_ids == (*enc("no"), EOS)


def test_implicit_prompt_is_the_common_prefix(tiny_tokenizer):
    history = [user("Hi"), assistant("Hello"), user("A film?")]
    row = {"chosen": history + [assistant("yes")], "rejected": history + [assistant("no")], "_source": "s"}
    assert split_implicit_prompt(row) == {
        "prompt": history,
        "chosen": [assistant("yes")],
        "rejected": [assistant("no")],
        "_source": "s",
    }
    explicit = {
        "prompt": history,
        "chosen": [assistant("yes")],
        "rejected": [assistant("no")],
        "_source": "s",
    }
    kw = {"max_length": 128, "max_prompt_length": 100, "index": 0}
    assert tokenize_pair(row, tiny_tokenizer, **kw) == tokenize_pair(explicit, tiny_tokenizer, **kw)


@pytest.mark.parametrize(
    ("chosen", "rejected", "field"),
    [
        ([user("Hi"), assistant("yes")], [user("Hi"), assistant("yes")], "chosen"),  # identical
        (
            [user("Hi"), assistant("a"), user("x"), assistant("b")],
            [user("Hi"), assistant("a"), user("y")],
            "chosen",
        ),
    ],
)
def test_implicit_prompt_must_end_before_the_final_assistant_turn(chosen, rejected, field):
    with pytest.raises(
        DataError, match=rf"f line 9: field '{field}': the prefix shared .* final assistant turn"
    ):
        split_implicit_prompt({"chosen": chosen, "rejected": rejected, "_source": "f line 9"})


def test_conversational_data_needs_a_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    row = {
        "prompt": [user("Hello")],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
        "_source": "f line 3",
    }
    with pytest.raises(
        DataError, match=r"f line 3: conversational data needs a tokenizer with a chat template"
    ):
        tokenize_pair(row, tokenizer, max_length=64, max_prompt_length=32, index=0)


def test_template_must_be_prefix_stable():
    from conftest import CHAT_TEMPLATE

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant\n{% endif %}", "assistant:\n{% endif %}")
    row = {
        "prompt": [user("Hello")],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
        "_source": "f line 3",
    }
    with pytest.raises(DataError, match=r"f line 3: the chat template is not prefix-stable"):
        tokenize_pair(row, tokenizer, max_length=64, max_prompt_length=32, index=0)


LONG_PROMPT = "I loved the story, the music and the ending."


def test_prompt_is_truncated_from_the_left(tiny_tokenizer, enc):
    row = {"prompt": LONG_PROMPT, "chosen": "great", "rejected": "bad"}
    prompt = enc(LONG_PROMPT)
    assert len(prompt) > 4 and len(enc("great")) == len(enc("bad")) == 2
    examples, stats = tokenize_rows([row], tiny_tokenizer, max_length=8, max_prompt_length=4)
    assert examples[0].prompt_ids == tuple(prompt[-4:])
    assert examples[0].chosen_ids == (*enc("great"), EOS)
    assert examples[0].truncated is False
    assert stats == TokenizeStats(
        total=1, kept=1, prompt_truncated=1, response_truncated=0, dropped_empty=0, dropped_identical=0
    )


def test_responses_are_truncated_from_the_right(tiny_tokenizer, enc):
    row = {"prompt": "Hello world.", "chosen": "The movie was great", "rejected": "bad"}
    assert (len(enc("Hello world.")), len(enc("The movie was great")), len(enc("bad"))) == (3, 4, 2)
    examples, stats = tokenize_rows([row], tiny_tokenizer, max_length=6, max_prompt_length=4)
    (example,) = examples
    assert example.prompt_ids == tuple(enc("Hello world."))  # 3 <= max_prompt_length: kept whole
    assert example.chosen_ids == tuple(enc("The movie was great")[:3])  # EOS cut off
    assert example.rejected_ids == (*enc("bad"), EOS)  # already fits in 6 - 3
    assert example.truncated is True
    assert stats == TokenizeStats(
        total=1, kept=1, prompt_truncated=0, response_truncated=1, dropped_empty=0, dropped_identical=0
    )


def test_prompt_then_responses_are_truncated(tiny_tokenizer, enc):
    row = {"prompt": LONG_PROMPT, "chosen": "The movie was great", "rejected": "The film was terrible"}
    examples, stats = tokenize_rows([row], tiny_tokenizer, max_length=5, max_prompt_length=2)
    (example,) = examples
    assert example.prompt_ids == tuple(enc(LONG_PROMPT)[-2:])
    assert example.chosen_ids == tuple(enc("The movie was great")[:3])
    assert example.rejected_ids == tuple(enc("The film was terrible")[:3])
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 1)


def test_exactly_max_length_is_not_truncated(tiny_tokenizer, enc):
    row = {"prompt": "Hello world.", "chosen": "great", "rejected": "bad"}  # 3 + 3 tokens
    example = tokenize_pair(row, tiny_tokenizer, max_length=6, max_prompt_length=1, index=0)
    assert example.prompt_ids == tuple(enc("Hello world."))
    assert example.truncated is False


def test_drops_keep_indices_contiguous(tiny_tokenizer, enc):
    # "The movie was great" and "The movie was bad" share their first 3 tokens.
    assert enc("The movie was great")[:3] == enc("The movie was bad")[:3]
    rows = [
        {"prompt": "Hello world.", "chosen": "great", "rejected": "bad", "_source": "f line 1"},
        {"prompt": "Hello world.", "chosen": "good", "rejected": "good", "_source": "f line 2"},
        {"prompt": "Hello world.", "chosen": "yes", "rejected": "no", "_source": "f line 3"},
        {"prompt": "Hello world.", "chosen": "", "rejected": "no", "_source": "f line 4"},
        {
            "prompt": "Hello world.",
            "chosen": "The movie was great",
            "rejected": "The movie was bad",
            "_source": "f line 5",
        },
        {"prompt": "Hello world.", "chosen": "good", "rejected": "no", "_source": "f line 6"},
    ]
    # Prompts are 3 tokens and fit; responses get 6 - 3 = 3 tokens, so line 5 becomes identical.
    examples, stats = tokenize_rows(rows, tiny_tokenizer, max_length=6, max_prompt_length=3)
    assert [(e.index, e.source) for e in examples] == [(0, "f line 1"), (1, "f line 3"), (2, "f line 6")]
    assert stats == TokenizeStats(
        total=6,
        kept=3,
        prompt_truncated=0,
        response_truncated=1,
        dropped_empty=1,
        dropped_identical=2,
        dropped=[  # named with file and line, so validate and train can report them
            "f line 2: dropped, chosen and rejected are the same tokens",
            "f line 4: dropped, a response has no token besides its EOS",
            "f line 5: dropped, chosen and rejected are the same tokens after truncation",
        ],
    )


def test_max_prompt_length_must_be_below_max_length(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_rows([GOOD], tiny_tokenizer, max_length=8, max_prompt_length=8)


# --- collation -----------------------------------------------------------------------------------------


def test_collate_pairs_exact_tensors():
    pad = EOS  # like SmolLM2: pad == eos, so masks must not come from pad ids
    examples = [
        PairExample(0, (5, 6), (7, EOS), (8, 9, EOS), score_chosen=1.0, score_rejected=0.0, margin=0.5),
        PairExample(1, (10,), (11, 12, 13, EOS), (14, EOS), score_chosen=2.0, score_rejected=3.0),
    ]
    batch = collate_pairs(examples, pad_token_id=pad)
    T, F = True, False
    expected = {
        "input_ids": torch.tensor(
            [[5, 6, 7, 2, 2], [10, 11, 12, 13, 2], [5, 6, 8, 9, 2], [10, 14, 2, 2, 2]], dtype=torch.long
        ),
        "attention_mask": torch.tensor(
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.long
        ),
        "response_mask": torch.tensor(
            [[F, F, T, T, F], [F, T, T, T, T], [F, F, T, T, T], [F, T, T, F, F]], dtype=torch.bool
        ),
        "index": torch.tensor([0, 1], dtype=torch.long),
        "chosen_lengths": torch.tensor([2, 4], dtype=torch.long),
        "rejected_lengths": torch.tensor([3, 2], dtype=torch.long),
        "score_chosen": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "score_rejected": torch.tensor([0.0, 3.0], dtype=torch.float64),
    }
    assert set(batch) == set(expected)  # no "margin": the second example has none
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype, key
        assert torch.equal(batch[key], value), key


def test_collate_pairs_optional_fields():
    examples = [
        PairExample(0, (1,), (4, EOS), (5, EOS), margin=1.5),
        PairExample(1, (1,), (6, EOS), (7, EOS), margin=-1),
    ]
    batch = collate_pairs(examples, pad_token_id=3)
    assert "score_chosen" not in batch and "score_rejected" not in batch
    assert torch.equal(batch["margin"], torch.tensor([1.5, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one example"):
        collate_pairs([], pad_token_id=3)


def test_end_to_end_one_eos_per_response_at_the_boundary(tmp_path, tiny_tokenizer, enc):
    path = write_jsonl(
        tmp_path / "e2e.jsonl",
        [
            {"prompt": "Hello world.", "chosen": "great", "rejected": "The film was terrible", "margin": 1},
            {
                "prompt": [user("Hello")],
                "chosen": [assistant("good")],
                "rejected": [assistant("bad")],
                "margin": 2,
            },
        ],
    )
    rows = load_rows(path)
    validate_rows(rows, require_margin=True)
    examples, _ = tokenize_rows(rows, tiny_tokenizer, max_length=64, max_prompt_length=32)
    batch = collate_pairs(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    responses = [
        enc("great"),
        enc("good"),
        enc("The film was terrible"),
        enc("bad"),
    ]
    prompts = [enc("Hello world."), enc(CHAT_PROMPT)] * 2
    for row in range(4):
        ids = batch["input_ids"][row][batch["response_mask"][row]].tolist()
        assert ids == responses[row] + [EOS]
        n_prompt = len(prompts[row])
        assert batch["input_ids"][row, :n_prompt].tolist() == prompts[row]
        assert not batch["response_mask"][row, :n_prompt].any()
    assert batch["margin"].tolist() == [1.0, 2.0]
    assert math.isclose(
        batch["attention_mask"].sum().item(), sum(len(p) + len(r) + 1 for p, r in zip(prompts, responses))
    )


def test_collate_prompts_left_pads():
    batch = collate_prompts([[5, 6, 7], [8]], pad_token_id=3)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [3, 3, 8]], dtype=torch.long))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]], dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"):
        collate_prompts([[5], []], pad_token_id=3)


def test_pre_tokenised_rows_are_used_exactly(tmp_path, tiny_tokenizer):
    """Rows carrying prompt_ids/chosen_ids/rejected_ids are tokenised as given: no BOS/EOS added."""
    from preftune.data import tokenize_rows, validate_rows

    row = {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "prompt_ids": [5, 6],
        "chosen_ids": [7, 8],
        "rejected_ids": [9],
    }
    validate_rows([row])
    (ex,), stats = tokenize_rows([row], tiny_tokenizer, max_length=16, max_prompt_length=8)
    assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == ((5, 6), (7, 8), (9,))
    bad = {**row, "_source": "f.jsonl line 3", "chosen_ids": [1, -2]}
    with pytest.raises(DataError, match="f.jsonl line 3: field 'chosen_ids'"):
        validate_rows([bad])
    partial = {k: v for k, v in row.items() if k != "rejected_ids"} | {"_source": "f.jsonl line 4"}
    with pytest.raises(DataError, match="f.jsonl line 4: field 'rejected_ids': missing"):
        validate_rows([partial])


def test_split_rows_keeps_each_prompt_on_one_side():
    rows = [{"prompt": f"p{i // 3}", "chosen": "a", "rejected": f"b{i}"} for i in range(30)]  # 10 prompts x 3
    rows += [
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z"}],
        }
        for i in range(3)
    ]  # implicit prompt: one conversation prefix shared by three rows
    for seed in range(5):
        train, evaluation = split_rows(rows, eval_fraction=0.2, seed=seed)
        key = lambda r: json.dumps(r.get("prompt") or r["chosen"][:1])  # noqa: E731
        assert not {key(r) for r in train} & {key(r) for r in evaluation}
        assert 6 <= len(evaluation) <= 8 and len(train) + len(evaluation) == 33
    one_prompt = [{"prompt": "same", "chosen": "a", "rejected": f"b{i}"} for i in range(4)]
    assert [len(p) for p in split_rows(one_prompt, eval_fraction=0.5, seed=0)] == [4, 0]


def test_empty_prompt_ids_mean_a_bos_only_prompt_and_every_response_token_is_scored(tiny_tokenizer):
    from preftune.data import collate_pairs

    bos = tiny_tokenizer.bos_token_id
    row = {
        "prompt": "",
        "chosen": "a",
        "rejected": "b",
        "prompt_ids": [],
        "chosen_ids": [7, 8, 9],
        "rejected_ids": [10, 11],
        "_source": "ids.jsonl line 2",
    }
    example = tokenize_pair(row, tiny_tokenizer, max_length=16, max_prompt_length=8, index=0)
    assert example.prompt_ids == (bos,)
    batch = collate_pairs([example], tiny_tokenizer.pad_token_id)
    scored = batch["response_mask"][:, 1:].sum(dim=1)  # the tokens the log-prob path scores
    assert scored.tolist() == [3, 2]
    assert batch["chosen_lengths"].tolist() == [3] and batch["rejected_lengths"].tolist() == [2]

    no_bos = build_tiny_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(
        DataError, match="ids.jsonl line 2: field 'prompt_ids': empty, and the tokenizer has no BOS"
    ):
        tokenize_pair(row, no_bos, max_length=16, max_prompt_length=8, index=0)


def test_token_ids_outside_the_vocabulary_are_refused_with_file_and_line(tmp_path, tiny_model_dir):
    from preftune.config import train_config_from_dict
    from preftune.training import prepare

    rows = [
        {
            "prompt": "p",
            "chosen": "a",
            "rejected": "b",
            "prompt_ids": [5],
            "chosen_ids": [6, 7],
            "rejected_ids": [8, 9],
        }
        for _ in range(2)
    ]
    rows[1]["rejected_ids"] = [8, 100000]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train_config_from_dict(
        {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(path)}}
    )
    with pytest.raises(
        DataError, match=r"ids.jsonl line 2: field 'rejected_ids': token id 100000 is outside"
    ):
        prepare(cfg, log=lambda *a: None)
