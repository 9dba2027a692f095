"""Example types shared by the task families, their tokenisation, packing and collation.

Two kinds of example:

- :class:`TextExample`: a passage of plain text for continued pre-training; passages are tokenised, joined
  with EOS and cut into blocks of ``block_size`` tokens whose labels are the input ids.
- :class:`SupervisedExample`: a (prompt, response) pair; the loss is masked to the response tokens
  (labels are -100 on the prompt and on padding) and the response ends with EOS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TextExample:
    """A passage (paragraph) of plain text."""

    text: str
    document: int = 0
    """Passages of one document are packed with a blank line between them; documents end with EOS."""


@dataclass(frozen=True)
class SupervisedExample:
    """A prompt (the user's message, before any chat formatting) and the response to learn."""

    prompt: str
    response: str
    answer: str | None = None
    """The gold answer an evaluator checks (GSM8K's final number, a classification label's verbaliser)."""


Example = TextExample | SupervisedExample


def example_text(example: Example) -> str:
    """All the text of an example (what mention filtering searches)."""
    if isinstance(example, TextExample):
        return example.text
    return f"{example.prompt}\n{example.response}"


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; task data needs one")
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (asked for and available)."""
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, message: str, chat_template: bool = True) -> str:
    """The model-facing prompt: the chat template's user turn plus the assistant header when the tokenizer
    has a template (and ``chat_template`` is on), else a plain instruction/response layout."""
    if uses_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{message}\n\n### Response:\n"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt; BOS is added by the tokenizer unless the text already carries it."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids of a response followed by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)]


def encode_supervised(
    tokenizer, examples: Sequence[SupervisedExample], max_length: int, chat_template: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Tokenise (prompt, response) pairs with labels masked to the response.

    A pair longer than ``max_length`` loses the start of its prompt first (down to half the budget), then the
    end of its response, so every item keeps at least one response token to learn from.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    items, truncated = [], 0
    for ex in examples:
        p = encode_prompt(tokenizer, format_prompt(tokenizer, ex.prompt, chat_template))
        r = encode_response(tokenizer, ex.response)
        if len(p) + len(r) > max_length:
            truncated += 1
            p = p[-max(max_length - len(r), max_length // 2) :]
            r = r[: max_length - len(p)]
        ids = torch.tensor(p + r, dtype=torch.long)
        labels = ids.clone()
        labels[: len(p)] = IGNORE_INDEX
        items.append({"input_ids": ids, "labels": labels})
    if truncated:
        log.info("truncated %d of %d examples to max_length=%d tokens", truncated, len(examples), max_length)
    return items


def pack_text(tokenizer, examples: Sequence[TextExample], block_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenise passages into one stream (a blank line between passages of a document, EOS after each
    document) and cut it into full blocks of ``block_size`` tokens (labels = input ids)."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    stream: list[int] = []
    eos, blank = [eos_id(tokenizer)], tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for ex, nxt in zip(examples, [*examples[1:], None]):
        stream += tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        stream += blank if nxt is not None and nxt.document == ex.document else eos
    n_blocks = len(stream) // block_size
    blocks = torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    return [{"input_ids": b, "labels": b.clone()} for b in blocks]


class TokenizedDataset(Dataset):
    """A list of tokenised items (``input_ids``, ``labels``: 1-D LongTensors)."""

    def __init__(self, items: list[dict[str, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

    @property
    def num_tokens(self) -> int:
        return sum(len(item["input_ids"]) for item in self.items)


@dataclass(frozen=True)
class Collator:
    """Right-pads a batch: ``input_ids`` with ``pad_id``, ``attention_mask`` 0 and ``labels`` -100 on padding.

    A picklable class rather than a closure, so DataLoader workers can use it under any start method.
    """

    pad_id: int

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n] = item["input_ids"]
            attention_mask[i, :n] = 1
            labels[i, :n] = item["labels"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
