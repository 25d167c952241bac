"""Collate tokenised pairs into a batch (examples -> batch).

:func:`collate_pairs` stacks chosen and rejected so one forward pass scores both (as in the
reference DPO code's ``concatenated_forward``): rows ``0..B-1`` are prompt + chosen, rows
``B..2B-1`` prompt + rejected, right-padded. Masks come from the token positions, never from
the pad id (SmolLM2's pad id equals its EOS id).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preftune.data.types import PairExample


def pack_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows: ``input_ids``, ``attention_mask`` (N, T) long and
    ``response_mask`` (N, T) bool, True exactly at response tokens (never prompt or padding)."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, T), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, T), dtype=torch.long)  # (N, T)
    response_mask = torch.zeros((n, T), dtype=torch.bool)  # (N, T)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n_prompt, end = len(prompt), len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :end] = 1
        response_mask[row, n_prompt:end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def pack_shared_prefix(
    prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One row per prompt: the prompt once, then each of its completions, right-padded; the attention lets
    every completion see the prompt and itself, never another completion, so the prompt is encoded once for
    all of them (GRPO's group, or DPO's chosen and rejected).

    Returns ``input_ids`` and ``position_ids`` (B, T) long (a completion's positions continue the prompt's);
    ``allowed`` (B, T, T) bool, True where query position q may attend to key position k (padding attends to
    itself only); ``source`` (M,) long, the flat index into (B·T) of the position that predicts each
    completion token (the last prompt position for a first token); ``targets`` (M,) long; ``completion`` (M,)
    long, which completion each token belongs to (completions numbered row by row). M counts every completion
    token, in the same order as :func:`pack_sequences` over (prompt, completion) pairs.
    """
    if len(prompts) != len(groups) or any(len(p) == 0 for p in prompts):
        raise ValueError("pack_shared_prefix needs one non-empty prompt per group")
    lengths = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, groups)]
    B, T = len(prompts), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # (B, T, T): padding sees itself
    source, targets, completion = [], [], []
    index = 0
    for row, (prompt, group) in enumerate(zip(prompts, groups)):
        n = len(prompt)
        input_ids[row, :n] = torch.tensor(list(prompt), dtype=torch.long)
        position_ids[row, :n] = torch.arange(n)
        allowed[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for ids in group:
            end = start + len(ids)
            if ids:
                input_ids[row, start:end] = torch.tensor(list(ids), dtype=torch.long)
                position_ids[row, start:end] = torch.arange(n, n + len(ids))
                allowed[row, start:end, :n] = True
                allowed[row, start:end, start:end] = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
                source += [row * T + n - 1] + [row * T + p for p in range(start, end - 1)]
                targets += list(ids)
                completion += [index] * len(ids)
            index += 1
            start = end
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "allowed": allowed,
        "source": torch.tensor(source, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "completion": torch.tensor(completion, dtype=torch.long),
    }


def collate_pairs(examples: Sequence[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch ``B`` pairs; ``T`` is the longest prompt + response.

    Returns
      ``input_ids``       (2B, T) long, right-padded with ``pad_token_id``;
      ``attention_mask``  (2B, T) long, 1 on real tokens;
      ``response_mask``   (2B, T) bool, True exactly at response tokens, so the log-prob of
                          ``input_ids[:, t]`` given ``input_ids[:, :t]`` counts where it is True;
      ``index``           (B,) long, the examples' ``index``;
      ``chosen_lengths``, ``rejected_lengths``  (B,) long, response token counts;
      ``score_chosen``, ``score_rejected``  (B,) float64, only if every example has both;
      ``margin``          (B,) float64, only if every example has one.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [ex.prompt_ids for ex in examples] * 2
    responses = [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
    packed = pack_sequences(prompts, responses, pad_token_id)  # (2B, T) each
    batch = {
        **packed,
        "index": torch.tensor([ex.index for ex in examples], dtype=torch.long),  # (B,)
        "chosen_lengths": torch.tensor([len(ex.chosen_ids) for ex in examples], dtype=torch.long),
        "rejected_lengths": torch.tensor([len(ex.rejected_ids) for ex in examples], dtype=torch.long),
    }
    if all(ex.score_chosen is not None and ex.score_rejected is not None for ex in examples):
        # float64: scores such as 1.00000001 and 1.0 must not become a tie
        batch["score_chosen"] = torch.tensor([ex.score_chosen for ex in examples], dtype=torch.float64)
        batch["score_rejected"] = torch.tensor([ex.score_rejected for ex in examples], dtype=torch.float64)
    if all(ex.margin is not None for ex in examples):
        batch["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float64)
    return batch


def collate_prompts(prompt_id_lists: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation: ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long."""
    if not prompt_id_lists:
        raise ValueError("collate_prompts needs at least one prompt")
    if any(len(ids) == 0 for ids in prompt_id_lists):
        raise ValueError("collate_prompts cannot generate from an empty prompt")
    T = max(len(ids) for ids in prompt_id_lists)
    input_ids = torch.full((len(prompt_id_lists), T), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(prompt_id_lists), T), dtype=torch.long)  # (N, T)
    for row, ids in enumerate(prompt_id_lists):
        input_ids[row, T - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, T - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
