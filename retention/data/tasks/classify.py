"""Classification: SST-2 TSV files (``sentence<TAB>label`` or ``label<TAB>sentence``, with or without a header),
JSON/JSONL records with text and label fields, or a built-in generated sentiment task. Labels are taught and
scored as verbalisers (e.g. ``0 -> "negative"``); accuracy compares each label's log-likelihood given the
prompt. A TSV row with the wrong number of columns, or a label of another kind than most (``pos`` among
``0``/``1``), is a malformed record, never an extra class."""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retention.data.readers import ReadReport, read_text, split_lines
from retention.data.tasks.examples import (
    SupervisedExample,
    encode_prompt,
    encode_response,
    format_prompt,
    pad_id,
)
from retention.data.tasks.sources import (
    convert_records,
    field,
    is_hub_source,
    local_file,
    read_records,
    text_field,
)
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
_NUMBER_LABEL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_tsv(
    path: Path, text_name: str, label_name: str, explicit_text: bool, report: ReadReport | None = None
) -> Iterator[tuple[str, dict[str, str]]]:
    """``(location, {text_name: text, label_name: raw label})`` rows of a two-column (or headed) TSV file in
    either column order (cells stripped; blank lines skipped).

    A first row that names ``label_name`` is a header: the label column is the one so named and the text column
    is ``text_name`` (when mapped explicitly), else a usual name (sentence, text, ...), else the only other
    column. Without a header the file has two columns, one of them integer labels. A row with another number of
    columns than the header (two without one) goes to ``report.reject`` (raised when there is no report).
    """
    where = str(path)
    report = report or ReadReport(where, hint="")
    lines = enumerate(split_lines(read_text(path)), 1)
    # No quoting: sentences contain bare quotes (the csv module's QUOTE_NONE reading, which this equals).
    rows = [(lineno, [c.strip() for c in line.split("\t")]) for lineno, line in lines if line.strip() or "\t" in line]
    if not rows:
        raise RecordError(where, "-", "<file>", "empty file, no records")
    header_line, header = rows[0]
    if label_name in header:
        li = header.index(label_name)
        others = [c for c in header if c != label_name]
        candidates = [text_name] if explicit_text else [c for c in _TEXT_COLUMNS if c in header] or others
        if len(candidates) != 1 or candidates[0] not in header:
            raise RecordError(where, f"line {header_line} (header)", text_name,
                              f"cannot tell the text column among {others}; map it with fields={{'text': ...}}")
        ti, rows, width, layout = header.index(candidates[0]), rows[1:], len(header), "as the header"
    else:
        (li, ti), width, layout = _label_column(where, rows), 2, "text and label"
    for lineno, row in rows:
        if len(row) != width:
            report.reject(RecordError(where, f"line {lineno}", "<row>",
                                      f"expected {width} tab-separated columns ({layout}), got {len(row)}"))
            continue
        yield f"line {lineno}", {text_name: row[ti], label_name: row[li]}


def _label_column(where: str, rows: list[tuple[int, list[str]]]) -> tuple[int, int]:
    """(label index, text index) of a headerless file: of the first 100 two-column rows, the column in which
    more (and most) cells are integers holds the labels."""
    sample = [row for _, row in rows[:100] if len(row) == 2]
    if not sample:
        raise RecordError(where, "-", "<file>", "a TSV without a header needs two columns (text and label)")
    ints = [sum(bool(_INT_LABEL.fullmatch(row[j])) for row in sample) for j in (0, 1)]
    if ints[0] == ints[1] or max(ints) * 2 <= len(sample):
        raise RecordError(
            where, "-", "<file>", "cannot tell the label column (give the file a header row naming a 'label' "
            "column, or map fields={'label': ...} to a header name)"
        )
    return (0, 1) if ints[0] > ints[1] else (1, 0)


def label_kind(raw: Any) -> str:
    """``integer`` (``1``, ``"1"``), ``number`` (``1.5``, ``"1.0"``), ``word`` (another string), or the type's name
    (``bool``, ``list``, ...)."""
    if isinstance(raw, str):
        key = raw.strip()
        return "integer" if _INT_LABEL.fullmatch(key) else "number" if _NUMBER_LABEL.fullmatch(key) else "word"
    if isinstance(raw, bool):
        return "bool"
    return "integer" if isinstance(raw, int) else "number" if isinstance(raw, float) else type(raw).__name__


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def verbalise(
    raw: Any, verbalizers: Mapping[str, str], where: str, location: str, name: str,
    kind: str | None = None, majority: str = "",
) -> str:
    """The label word of a raw label: its verbaliser, or the label itself when it is a non-integer string.
    ``kind`` is the :func:`label_kind` of the source's labels (``majority`` says how many have it): a label of
    another kind is an error."""
    if kind is not None and label_kind(raw) != kind:
        raise RecordError(where, location, name, f"label {raw!r} is {_a(label_kind(raw))}, but the labels of this "
                          f"source are {kind}s ({majority}); a source's labels are all integers (turned into words "
                          "by verbalizers) or all words")
    key = str(raw).strip()
    if key in verbalizers:
        return verbalizers[key]
    if isinstance(raw, str) and key and not _INT_LABEL.fullmatch(key):
        return key
    raise RecordError(where, location, name, f"label {raw!r} has no verbaliser (verbalizers: {dict(verbalizers)})")


def classification_example(text: str, label: str, labels: Sequence[str], template: str) -> SupervisedExample:
    prompt = template.format(text=text.strip(), labels=", ".join(labels))
    return SupervisedExample(prompt, label, answer=label)


def load(config: TaskConfig, report: ReadReport) -> list[SupervisedExample]:
    """The examples of the configured source; malformed records go to ``report.reject``."""
    if config.source == "builtin":
        pairs = builtin_pairs(config.limit or BUILTIN_SIZE, config.seed)
    else:
        pairs = _pairs(config, report)
    labels = sorted({label for _, label in pairs})
    template = config.prompt_template or DEFAULT_PROMPT
    return [classification_example(text, label, labels, template) for text, label in pairs]


def _pairs(config: TaskConfig, report: ReadReport) -> list[tuple[str, str]]:
    """(text, label word) of each good record: a first pass reads the records, a second checks each label
    against the kind most labels have (ties: integer, then word) and verbalises it."""
    text_name, label_name, where = config.field("text"), config.field("label"), config.source

    def text_and_label(loc: str, r: Any) -> tuple[str, tuple[str, Any]]:
        text = text_field(r, text_name, where, loc, max_chars=config.max_prompt_chars)
        return loc, (text, field(r, label_name, where, loc))

    rows = convert_records(_records(config, report), text_and_label, report)
    kinds = Counter(label_kind(raw) for _, (_, raw) in rows)
    kind = max(kinds, key=lambda k: (kinds[k], k == "integer", k == "word"), default=None)
    majority = f"{kinds[kind]} of {len(rows)}" if kind else ""

    def pair(loc: str, row: tuple[str, Any]) -> tuple[str, str]:
        label = verbalise(row[1], config.verbalizers, where, loc, label_name, kind, majority)
        if config.labels is not None and label not in config.labels:
            raise RecordError(where, loc, label_name,
                              f"label {label!r} is not one of task.labels {config.labels}")
        return row[0], label

    pairs = convert_records(rows, pair, report)
    if config.labels is None:
        counts = Counter(label for _, label in pairs)
        check_vocabulary(counts, set(config.verbalizers.values()), where, label_name)
    return pairs


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def check_vocabulary(counts: Counter[str], declared: set[str], where: str, name: str) -> None:
    """Refuse a label vocabulary that holds a likely typo, which would become a class of its own in every
    prompt: a label not in ``declared`` (the verbalisers' words) that is rare (at most 1% of the records) or
    within one letter (labels of up to 5 letters) or two of a label at least as frequent. Labels under 4
    letters are never near one another (``A``/``B``, ``yes``/``no``)."""

    def near(a: str, b: str) -> bool:
        allowed = 1 if max(len(a), len(b)) <= 5 else 2
        return min(len(a), len(b)) >= 4 and edit_distance(a.lower(), b.lower()) <= allowed

    n = sum(counts.values())
    for label, count in sorted(counts.items(), key=lambda item: (item[1], item[0])):
        if label in declared:
            continue
        close = [other for other in counts
                 if other != label and counts[other] >= count and near(label, other)]
        if close or count * 100 <= n:
            why = (f"is within one or two letters of {close[0]!r} ({counts[close[0]]} records)" if close
                   else "is that rare")
            raise RecordError(where, "-", name, f"label {label!r} appears in {count} of {n} records and "
                              f"{why}: a misspelt label would be a class of its own in every prompt. Correct the "
                              "records, or list the label words with task.labels (then any other label is a "
                              "malformed record)")


def _records(config: TaskConfig, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` of a TSV file (rows as ``{text: ..., label: ...}``), a JSON/JSONL file or a hub
    dataset."""
    text_name, label_name, where = config.field("text"), config.field("label"), config.source
    if not is_hub_source(where) and local_file(where).suffix == ".tsv":
        return read_tsv(local_file(where), text_name, label_name, "text" in config.fields, report)
    return read_records(where, config.hf_config, config.hf_split, (".tsv",), report)


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
