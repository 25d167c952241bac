"""Tokenise preference rows into :class:`PairExample` (rows -> examples).

The prompt and each response are tokenised **separately** and concatenated, so the boundary
between prompt and response tokens is exact (no BPE merge across it).

Standard format (``prompt``, ``chosen``, ``rejected`` are strings):

* prompt tokens = ``tokenizer(prompt, add_special_tokens=True)``, i.e. with the BOS where the
  tokenizer adds one, but never a double BOS: a prompt whose text already begins with the BOS
  token string is tokenised with ``add_special_tokens=False``;
* response tokens = ``tokenizer(response, add_special_tokens=False)`` + ``[eos]``, EOS exactly
  once: none is added when the text already ends with the EOS token string.

Conversational format (lists of ``{"role", "content"}`` messages):

* prompt text = ``apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)``;
* full text = ``apply_chat_template(prompt + response, tokenize=False)``; it must start with the
  prompt text (else :class:`DataError`: the template is not prefix-stable);
* response text = ``full[len(prompt text):]``, cut right after the *last* EOS token string
  (dropping what the template puts after it, such as a newline);
* both texts are tokenised with ``add_special_tokens=False`` (the template writes its own BOS,
  if any), then the same EOS-exactly-once rule. A multi-turn prompt is every message before the
  final assistant reply. The implicit-prompt format (no ``prompt``) is first turned into this
  one by :func:`split_implicit_prompt`.

A standard row whose prompt is the rendered chat prompt and whose response is the assistant
content therefore gives the same ids as the conversational row.

Truncation (like TRL's ``keep_end`` for the prompt): with ``L = len(prompt) + max(len(chosen),
len(rejected))``, if ``L > max_length``, first keep only the **last** ``max_prompt_length``
prompt tokens (those nearest the response; counted in ``prompt_truncated``); if still too long,
cut both responses **from the right** to ``max_length - len(prompt)`` tokens (counted in
``response_truncated``; the EOS is then usually gone and the example has ``truncated=True``).
Pre-tokenised rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` lists of token ids beside the
texts) are used exactly as given — no BOS or EOS is added — and truncated by the same rule. An empty
``prompt_ids`` means an unconditional response: the prompt is the BOS token alone (the first response token
must be predicted from some position, so |y| tokens are scored and counted); a tokenizer without a BOS
token refuses such a row. The
experiment writes its sampled pairs this way, so training sees exactly the tokens the model sampled
(a response cut at ``max_new_tokens`` has no EOS, and none is invented).

A pair is dropped when a response has no token besides its EOS (``dropped_empty``) or when the
chosen and rejected ids are identical (``dropped_identical``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from preftune.data.types import DataError, PairExample


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_rows`: ``kept + dropped_empty + dropped_identical == total``.

    ``prompt_truncated`` and ``response_truncated`` count every pair truncated, dropped or not.
    ``dropped`` names the first :data:`MAX_NAMED_DROPS` dropped records (file and line) and why.
    """

    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    dropped: list[str] = dataclasses.field(default_factory=list)


MAX_NAMED_DROPS = 10


def _eos(tokenizer) -> tuple[str, int]:
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; preference pairs need one")
    return tokenizer.eos_token, tokenizer.eos_token_id


def response_ids(tokenizer, text: str) -> list[int]:
    """Response tokens (no special tokens added) followed by exactly one EOS."""
    eos_text, eos_id = _eos(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not (text.endswith(eos_text) and ids and ids[-1] == eos_id):
        ids.append(eos_id)
    return ids


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Prompt tokens: with one BOS where the tokenizer adds it (string), or the rendered chat
    prompt with the generation prompt (messages). Also used to build generation prompts."""
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    _require_chat_template(tokenizer, "a conversational prompt")
    text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_implicit_prompt(row: dict) -> dict:
    """Turn an implicit-prompt row into an explicit one.

    ``chosen`` and ``rejected`` are full conversations; the prompt is their longest common
    message prefix, which must end before the final assistant turn: both remainders must start
    and end with an ``assistant`` message. Returns a new row with ``prompt``, ``chosen`` and
    ``rejected`` (the remainders); other keys are copied.
    """
    source = row.get("_source", "row")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            f"{source}: field 'prompt': missing, and 'chosen'/'rejected' are not both lists of messages"
        )
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise DataError(
            f"{source}: field 'prompt': missing, and 'chosen' and 'rejected' share no prompt messages"
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[k:]
        if not rest or rest[0].get("role") != "assistant" or rest[-1].get("role") != "assistant":
            raise DataError(
                f"{source}: field {field!r}: the prefix shared by 'chosen' and 'rejected' ({k} message(s)) "
                "must end before the final assistant turn"
            )
    return {**row, "prompt": chosen[:k], "chosen": chosen[k:], "rejected": rejected[k:]}


def _require_chat_template(tokenizer, what: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{what} needs a tokenizer with a chat template; {name!r} has none")


def _apply_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _render_response(
    tokenizer, prompt_text: str, messages: list[dict], response: list[dict], where: str
) -> str:
    """The text the chat template adds for ``response`` after the prompt, ending at the last EOS."""
    full = _apply_template(tokenizer, messages + response, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template is not prefix-stable: the rendered prompt (with generation "
            "prompt) is not a prefix of the rendered prompt + response"
        )
    text = full[len(prompt_text) :]
    eos_text, _ = _eos(tokenizer)
    cut = text.rfind(eos_text)
    return text[: cut + len(eos_text)] if cut >= 0 else text


@dataclass
class _Outcome:
    example: PairExample | None
    prompt_truncated: bool = False
    response_truncated: bool = False
    dropped: str = ""  # "" | "empty" | "identical"


def _tokenize(row: dict, tokenizer, *, max_length: int, max_prompt_length: int, index: int) -> _Outcome:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
            f"max_length={max_length}"
        )
    source = row.get("_source", f"row {index}")
    if "prompt" not in row:
        row = split_implicit_prompt(row)
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]

    if "chosen_ids" in row:  # pre-tokenised: the ids are used exactly as given (no EOS added)
        p, c, r = list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])
        if not p:  # the first response token is predicted from something: an empty prompt is the BOS token
            if tokenizer.bos_token_id is None:
                raise DataError(
                    f"{source}: field 'prompt_ids': empty, and the tokenizer has no BOS token to stand for an "
                    "empty prompt; give at least one prompt token"
                )
            p = [tokenizer.bos_token_id]
    elif isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise DataError(f"{source}: field 'chosen'/'rejected': must be strings, like 'prompt'")
        p = prompt_ids(tokenizer, prompt)
        c, r = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
    else:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{source}: field 'chosen'/'rejected': must be lists of messages, like 'prompt'")
        _require_chat_template(tokenizer, f"{source}: conversational data")
        prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
        p = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        c = response_ids(tokenizer, _render_response(tokenizer, prompt_text, prompt, chosen, source))
        r = response_ids(tokenizer, _render_response(tokenizer, prompt_text, prompt, rejected, source))

    outcome = _Outcome(example=None)
    if len(p) + max(len(c), len(r)) > max_length:
        if len(p) > max_prompt_length:
            p = p[len(p) - max_prompt_length :]  # keep the end, nearest the response
            outcome.prompt_truncated = True
        budget = max_length - len(p)  # >= 1 because max_prompt_length < max_length
        if max(len(c), len(r)) > budget:
            c, r = c[:budget], r[:budget]
            outcome.response_truncated = True

    eos_id = tokenizer.eos_token_id
    if any(ids in ([], [eos_id]) for ids in (c, r)):
        outcome.dropped = "empty"
        return outcome
    if c == r:
        outcome.dropped = "identical"
        return outcome

    def number(field: str) -> float | None:
        return float(row[field]) if row.get(field) is not None else None

    outcome.example = PairExample(
        index=index,
        prompt_ids=tuple(p),
        chosen_ids=tuple(c),
        rejected_ids=tuple(r),
        score_chosen=number("score_chosen"),
        score_rejected=number("score_rejected"),
        margin=number("margin"),
        source=source,
        truncated=outcome.response_truncated,
    )
    return outcome


def tokenize_pair(
    row: dict, tokenizer, *, max_length: int, max_prompt_length: int, index: int
) -> PairExample | None:
    """Tokenise one row (any of the three formats); ``None`` when the pair is dropped."""
    return _tokenize(
        row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, index=index
    ).example


def tokenize_rows(
    rows: list[dict], tokenizer, *, max_length: int, max_prompt_length: int
) -> tuple[list[PairExample], TokenizeStats]:
    """Tokenise all rows; kept examples get ``index`` 0..kept-1 in order."""
    examples: list[PairExample] = []
    stats = TokenizeStats(total=len(rows))
    for i, row in enumerate(rows):
        if "_source" not in row:
            row = {**row, "_source": f"row {i}"}
        outcome = _tokenize(
            row, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, index=len(examples)
        )
        stats.prompt_truncated += outcome.prompt_truncated
        stats.response_truncated += outcome.response_truncated
        if outcome.dropped == "empty":
            stats.dropped_empty += 1
        elif outcome.dropped == "identical":
            stats.dropped_identical += 1
        else:
            examples.append(outcome.example)
        if outcome.dropped and len(stats.dropped) < MAX_NAMED_DROPS:
            cut = " after truncation" if outcome.response_truncated else ""
            why = {
                "empty": f"a response has no token besides its EOS{cut}",
                "identical": f"chosen and rejected are the same tokens{cut}",
            }[outcome.dropped]
            stats.dropped.append(f"{row['_source']}: dropped, {why}")
    stats.kept = len(examples)
    return examples, stats
