"""Classification: SST-2 TSV files (``sentence<TAB>label`` or ``label<TAB>sentence``, with or without a header),
JSON/JSONL records with text and label fields, or a built-in generated sentiment task. Labels are taught and
scored as verbalisers (e.g. ``0 -> "negative"``); accuracy compares each label's log-likelihood given the
prompt."""

from __future__ import annotations

import csv
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retention.data.tasks.examples import (
    SupervisedExample,
    encode_prompt,
    encode_response,
    format_prompt,
    pad_id,
)
from retention.data.tasks.sources import field, is_hub_source, local_file, read_records, text_field
from retention.records import RecordError
from retention.scoring import ScoreRow, score_rows

if TYPE_CHECKING:
    from torch import nn

    from retention.data.tasks.task import TaskConfig

log = logging.getLogger(__name__)

FIELDS = {"text": "text", "label": "label"}
DEFAULT_PROMPT = "Classify the following text. Answer with one of: {labels}.\n\n{text}"
BUILTIN_SIZE = 2000
_TEXT_COLUMNS = ("sentence", "text", "content", "review")
_INT_LABEL = re.compile(r"-?\d+")


def read_tsv(path: Path, text_name: str, label_name: str, explicit_text: bool) -> Iterator[tuple[str, str, str]]:
    """``(location, text, raw label)`` rows of a two-column (or headed) TSV file in either column order.

    A first row that names ``label_name`` is a header: the label column is the one so named and the text column
    is ``text_name`` (when mapped explicitly), else a usual name (sentence, text, ...), else the only other
    column. Without a header the file must have two columns, one of them integer labels.
    """
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # sentences contain bare quotes
        rows = [(lineno, [c.strip() for c in row]) for lineno, row in enumerate(reader, 1) if row]
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = rows[0][1]
    if label_name in header:
        li = header.index(label_name)
        others = [c for c in header if c != label_name]
        candidates = [text_name] if explicit_text else [c for c in _TEXT_COLUMNS if c in header] or others
        if len(candidates) != 1 or candidates[0] not in header:
            raise RecordError(str(path), "line 1 (header)", text_name,
                              f"cannot tell the text column among {others}; map it with fields={{'text': ...}}")
        ti, rows = header.index(candidates[0]), rows[1:]
    else:
        li, ti = _label_column(path, rows)
    for lineno, row in rows:
        if len(row) <= max(li, ti):
            raise RecordError(str(path), f"line {lineno}", label_name, f"expected {max(li, ti) + 1} columns, got {len(row)}")
        yield f"line {lineno}", row[ti], row[li]


def _label_column(path: Path, rows: list[tuple[int, list[str]]]) -> tuple[int, int]:
    """(label index, text index) of a headerless two-column file: the label column holds integers."""
    sample = [row for _, row in rows[:100]]
    if any(len(row) != 2 for row in sample):
        raise ValueError(f"{path}: a TSV without a header needs exactly two columns (text and label)")
    numeric = [all(_INT_LABEL.fullmatch(row[j]) for row in sample) for j in (0, 1)]
    if numeric[0] == numeric[1]:
        raise ValueError(
            f"{path}: cannot tell the label column (give the file a header row naming a 'label' column, "
            "or map fields={'label': ...} to a header name)"
        )
    return (0, 1) if numeric[0] else (1, 0)


def verbalise(raw: Any, verbalizers: Mapping[str, str], where: str, location: str, name: str) -> str:
    """The label word of a raw label: its verbaliser, or the label itself when it is a non-numeric string."""
    key = str(raw).strip()
    if key in verbalizers:
        return verbalizers[key]
    if isinstance(raw, str) and key and not _INT_LABEL.fullmatch(key):
        return key
    raise RecordError(where, location, name, f"label {raw!r} has no verbaliser (verbalizers: {dict(verbalizers)})")


def classification_example(text: str, label: str, labels: Sequence[str], template: str) -> SupervisedExample:
    prompt = template.format(text=text.strip(), labels=", ".join(labels))
    return SupervisedExample(prompt, label, answer=label)


def load(config: TaskConfig) -> list[SupervisedExample]:
    if config.source == "builtin":
        pairs = builtin_pairs(config.limit or BUILTIN_SIZE, config.seed)
    else:
        pairs = [(text, verbalise(raw, config.verbalizers, where, loc, config.field("label")))
                 for where, loc, text, raw in _records(config)]
    labels = sorted({label for _, label in pairs})
    template = config.prompt_template or DEFAULT_PROMPT
    return [classification_example(text, label, labels, template) for text, label in pairs]


def _records(config: TaskConfig) -> Iterator[tuple[str, str, str, Any]]:
    """``(where, location, text, raw label)`` of a TSV file, a JSON/JSONL file or a hub dataset."""
    text_name, label_name, where = config.field("text"), config.field("label"), config.source
    if not is_hub_source(where) and local_file(where).suffix == ".tsv":
        for loc, text, raw in read_tsv(local_file(where), text_name, label_name, "text" in config.fields):
            if not text:
                raise RecordError(where, loc, text_name, "empty")
            yield where, loc, text, raw
        return
    for loc, r in read_records(where, config.hf_config, config.hf_split, (".tsv",)):
        yield where, loc, text_field(r, text_name, where, loc), field(r, label_name, where, loc)


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer, examples: Sequence[SupervisedExample], batch_size: int = 16,
    chat_template: bool = True, labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy of picking the label whose response (verbaliser + EOS, as trained) has the highest total
    log-likelihood given the prompt: ``{"accuracy": ...}``. One right-padded forward per batch of
    (example, label) rows."""
    t0 = time.perf_counter()
    labels = sorted(labels or {ex.answer for ex in examples})
    label_ids = [encode_response(tokenizer, label) for label in labels]
    rows = []
    for ex in examples:
        p = encode_prompt(tokenizer, format_prompt(tokenizer, ex.prompt, chat_template))
        rows += [ScoreRow(p + ids, len(p), len(ids)) for ids in label_ids]
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        step = batch_size * len(labels)
        for start in range(0, len(rows), step):
            scores += [lp.sum().item() for lp, _, _ in score_rows(model, rows[start : start + step], pad_id(tokenizer))]
    finally:
        model.train(was_training)
    per_example = torch.tensor(scores).view(len(examples), len(labels))
    predicted = [labels[i] for i in per_example.argmax(1).tolist()]
    correct = sum(p == ex.answer for p, ex in zip(predicted, examples))
    accuracy = correct / len(examples)
    log.info("classify accuracy %.3f on %d examples (%.1f s)", accuracy, len(examples), time.perf_counter() - t0)
    return {"accuracy": accuracy}


# Built-in task: short reviews built from templates; the label follows the adjective's polarity, flipped by
# a negation, so a model must read the whole sentence.
_THINGS = "film meal hotel book concert phone game service course album trip show".split()
_POSITIVE = "wonderful delightful excellent charming brilliant moving enjoyable superb clever lovely".split()
_NEGATIVE = "dreadful boring awful tedious clumsy dull disappointing bland sloppy tiresome".split()
_TEMPLATES = (
    "The {thing} was {neg}{adj}.",
    "I found the {thing} {neg}{adj} from start to finish.",
    "Honestly, this {thing} is {neg}{adj}.",
    "Overall, the {thing} was {neg}{adj}.",
    "Everyone agreed that the {thing} was {neg}{adj}.",
    "My friends said the {thing} felt {neg}{adj}, and I agree.",
)


def builtin_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` generated (review, "positive" | "negative") pairs, about half of each."""
    r = random.Random(seed)
    pairs = []
    for i in range(n):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        polarity = r.random() < 0.5
        negated = r.random() < 0.3
        adj = r.choice(_POSITIVE if polarity else _NEGATIVE)
        text = template.format(thing=r.choice(_THINGS), adj=adj, neg="not " if negated else "")
        pairs.append((text[0].upper() + text[1:], "positive" if polarity != negated else "negative"))
    return pairs
