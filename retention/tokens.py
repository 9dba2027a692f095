"""Prompt and target tokenisation and right-padding: the ground floor shared by scoring (:mod:`retention.scoring`)
and the editors (:mod:`retention.editing`), importing nothing of the project.

A prompt is tokenised as the model reads it (with the tokenizer's special prefix, e.g. BOS); a target is the
continuation ``" " + target`` without one, so ``prompt_ids(p) + target_ids(t)`` is the scored sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with the tokenizer's special tokens (as the model reads a prompt)."""
    return tokenizer(prompt)["input_ids"]


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of ``" " + target`` without a BOS token."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token sequences, right-padded to the longest."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return input_ids, mask
