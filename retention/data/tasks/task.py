"""Task configuration and the factory that turns a configuration and a tokenizer into train/val datasets."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from torch import nn

from retention.data.readers import MAX_PROMPT_CHARS, ON_ERROR, ReadReport
from retention.data.tasks import classify, instruct, math_problems, text
from retention.data.tasks.examples import (
    Collator,
    Example,
    TokenizedDataset,
    encode_supervised,
    pack_text,
    pad_id,
)
from retention.data.tasks.filtering import filter_mentions, split_validation

log = logging.getLogger(__name__)

Family = Literal["text", "instruct", "math", "classify"]
FAMILIES: dict[str, ModuleType] = {"text": text, "instruct": instruct, "math": math_problems, "classify": classify}


@dataclass
class TaskConfig:
    """Which downstream task to fine-tune on and how to tokenise it."""

    family: Family = "text"
    """``text`` (continued pre-training, packed blocks), ``instruct``, ``math`` or ``classify``."""
    source: str = "builtin"
    """``builtin`` (the family's offline default), a local file, or ``hf:<dataset id>`` (needs ``datasets``)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Field mapping, canonical name -> name in the data. Canonical names: text: ``text``; instruct:
    ``instruction``, ``input``, ``output``; math: ``question``, ``answer``; classify: ``text``, ``label``."""
    hf_config: str | None = None
    """Configuration name of a hub dataset (e.g. ``wikitext-2-raw-v1``)."""
    hf_split: str = "train"
    """Split of a hub dataset."""
    block_size: int = 100
    """Tokens per packed block (text family; the paper uses 100)."""
    max_length: int = 512
    """Longest supervised example in tokens (prompt + response); longer ones are truncated."""
    val_fraction: float = 0.1
    """Fraction of the (filtered) examples held out for validation."""
    limit: int | None = None
    """Use at most this many examples (passages for text) of the source; built-in sources generate this many."""
    seed: int = 0
    """Seed of the built-in generators and of the validation split."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one (supervised families)."""
    verbalizers: dict[str, str] = field(default_factory=lambda: {"0": "negative", "1": "positive"})
    """Classify: raw label -> the word the model learns and is scored on (word labels default to themselves). The
    labels of a source are of one kind, integers (``0``/``1``) or words (``spam``/``ham``), the kind most of them
    have; a label of another kind (``pos`` or ``1.0`` among integers) is a malformed record."""
    labels: list[str] | None = None
    """Classify: the label words (after verbalizers) a source has; a record with another is malformed. None:
    the words found, where a rare label (at most 1% of the records) or one within a letter or two of another
    is refused as a likely typo unless it is a verbaliser's word."""
    prompt_template: str | None = None
    """Classify: the user message, with ``{text}`` and optionally ``{labels}``; None for the default."""
    max_new_tokens: int = 256
    """Math: generation budget of the accuracy evaluator."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed records of a task file (invalid JSON, a missing or empty field, a row with the wrong number of
    columns, a label of the wrong kind, a too long text): ``raise`` an error naming the file, the record and the
    field, or ``skip`` them (counted in ``Task.read_report`` and logged with the first reasons)."""
    max_prompt_chars: int = MAX_PROMPT_CHARS
    """Longest text, in characters, of a field that goes into a prompt (instruct ``instruction`` and ``input``,
    math ``question``, classify ``text``); a longer one is a malformed record. Not applied to the text family,
    whose passages are cut into blocks."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"task.family: unknown family {self.family!r}; choose from {', '.join(FAMILIES)}")
        unknown = sorted(set(self.fields) - set(FAMILIES[self.family].FIELDS))
        if unknown:
            raise ValueError(
                f"task.fields: unknown field(s) {', '.join(unknown)} for the {self.family} family "
                f"(canonical fields: {', '.join(FAMILIES[self.family].FIELDS)})"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"task.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("block_size", "max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"task.{name} must be at least 2, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"task.limit must be positive or None, got {self.limit}")
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain '{text}'")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"task.on_error: {self.on_error!r}; choose from {', '.join(ON_ERROR)}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"task.max_prompt_chars must be positive, got {self.max_prompt_chars}")

    def field(self, canonical: str) -> str:
        """The name of a canonical field in the data."""
        return self.fields.get(canonical, FAMILIES[self.family].FIELDS[canonical])


@dataclass
class Task:
    """A built task: tokenised train/val datasets, their collate function and the examples behind them."""

    config: TaskConfig
    train: TokenizedDataset
    val: TokenizedDataset
    collate: Collator
    train_examples: list[Example]
    val_examples: list[Example]
    n_dropped: int
    """Examples dropped because they mention an excluded (edited or control) term."""
    read_report: ReadReport | None = None
    """What reading the source gave: records read, malformed ones skipped (``on_error: skip``) and why."""

    @property
    def has_accuracy(self) -> bool:
        """Whether the family defines a task accuracy (math, classify)."""
        return self.config.family in ("math", "classify")

    def evaluate(self, model: nn.Module, tokenizer, n: int | None = None, batch_size: int = 8) -> dict[str, float]:
        """Task accuracy on the first ``n`` validation examples (all when None); empty for families without one."""
        examples = self.val_examples[:n] if n is not None else self.val_examples
        if not self.has_accuracy or not examples:
            return {}
        if self.config.family == "math":
            return math_problems.evaluate(model, tokenizer, examples, batch_size, self.config.max_new_tokens,
                                          self.config.chat_template)
        labels = sorted({ex.answer for ex in self.train_examples + self.val_examples})
        return classify.evaluate(model, tokenizer, examples, batch_size, self.config.chat_template, labels)


_HINT = "task.on_error: skip (--data.task.on_error skip) skips malformed records and counts them"


def read_examples(config: TaskConfig) -> tuple[list[Example], ReadReport]:
    """The examples of a task's source, capped at ``config.limit``, and a report of what was read and skipped
    (``read`` counts the examples before the cap; the summary is logged, as a warning when records were skipped)."""
    t0 = time.perf_counter()
    report = ReadReport(config.source, format=config.family, on_error=config.on_error, hint=_HINT)
    examples = FAMILIES[config.family].load(config, report)
    report.read, report.seconds = len(examples), time.perf_counter() - t0
    (log.warning if report.skipped else log.info)(report.summary())
    return (examples[: config.limit] if config.limit is not None else examples), report


def load_examples(config: TaskConfig) -> list[Example]:
    """The examples of a task's source, capped at ``config.limit`` (see :func:`read_examples`)."""
    return read_examples(config)[0]


def build_task(config: TaskConfig, tokenizer, exclude_terms: Iterable[str] = ()) -> Task:
    """Read, filter (drop examples mentioning ``exclude_terms``), split and tokenise a task."""
    t0 = time.perf_counter()
    examples, report = read_examples(config)
    kept, n_dropped = filter_mentions(examples, exclude_terms)
    train_ex, val_ex = split_validation(kept, config.val_fraction, config.seed)
    encode: Callable[[Sequence[Example]], list] = (
        (lambda exs: pack_text(tokenizer, exs, config.block_size)) if config.family == "text"
        else (lambda exs: encode_supervised(tokenizer, exs, config.max_length, config.chat_template))
    )
    train, val = TokenizedDataset(encode(train_ex)), TokenizedDataset(encode(val_ex))
    if len(train) == 0:
        raise ValueError(
            f"task {config.family} from {config.source}: no training data left "
            f"({len(examples)} examples, {n_dropped} dropped as mentioning excluded terms, block_size={config.block_size})"
        )
    log.info(
        "task %s from %s: %d examples, %d dropped (mention excluded terms), train %d items / %d tokens, "
        "val %d items / %d tokens (%.1f s)", config.family, config.source, len(examples), n_dropped,
        len(train), train.num_tokens, len(val), val.num_tokens, time.perf_counter() - t0,
    )
    return Task(config, train, val, Collator(pad_id(tokenizer)), train_ex, val_ex, n_dropped, report)
