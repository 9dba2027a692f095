"""What every knowledge format shares: the :class:`ReadReport` of a read, typed field access whose errors name the
file, the record and the field (:class:`Raw`), and the checks of a converted record (:func:`validate`)."""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, field
from string import Formatter
from typing import Any

from retention.records import KnowledgeRecord, RecordError

ON_ERROR = ("raise", "skip")

MAX_PROMPT_CHARS = 20_000
"""Default longest text (prompt, subject, target, ...) of a record, in characters: a longer one is malformed, as
scoring pads every prompt of a batch to the longest (a 560 KB prompt asked for 48 GB)."""

_INDEX = re.compile(r"\[\d+\]")

_HINT = "on_error='skip' (--on_error skip, edits.on_error: skip) skips malformed records and counts them"


@dataclass
class ReadReport:
    """What a read produced: the detected format, how many records were kept and which were skipped."""

    path: str
    format: str = ""
    read: int = 0
    skipped: int = 0
    errors: list[RecordError] = field(default_factory=list)
    """The errors of the skipped records, in the order they were found."""
    seconds: float = 0.0
    on_error: str = "raise"
    """``raise``: :meth:`reject` raises the error; ``skip``: it counts the record as skipped."""
    hint: str = _HINT
    """How to skip malformed records instead, added as a note to a raised record error."""
    dropped: int = 0
    """Records left out by design, not errors (blank records of the text task family)."""
    ignored: dict[str, int] = field(default_factory=dict)
    """Fields read but not used (answer aliases, unknown keys): ``"<field>: <why>"`` (list indices as ``[]``) ->
    the number of records that had it."""
    ignored_first: dict[str, str] = field(default_factory=dict)
    """The first record of each :attr:`ignored` entry, as ``"<file>: record <r>: field '<field>'"``."""

    def ignore(self, path: str, ref: str | int, field_name: str, why: str) -> None:
        """Count a field of a kept record that is not used."""
        key = f"{_INDEX.sub('[]', field_name)}: {why}"
        self.ignored[key] = self.ignored.get(key, 0) + 1
        self.ignored_first.setdefault(key, f"{path}: record {ref}: field '{field_name}'")

    def reject(self, err: RecordError) -> None:
        """Raise ``err`` (with :attr:`hint`) under ``on_error='raise'``; count it as skipped under ``'skip'``."""
        if self.on_error != "skip":
            if self.hint:
                err.add_note(self.hint)
            raise err
        self.skipped += 1
        self.errors.append(err)

    def summary(self, reasons: int = 3) -> str:
        """One line: what was read, and how many records were skipped with the first ``reasons`` errors."""
        text = f"read {self.read} records ({self.format or 'no'} format) from {self.path} in {self.seconds:.2f} s"
        if self.dropped:
            text += f", left out {self.dropped} blank"
        if self.skipped:
            first = "; ".join(str(e) for e in self.errors[:reasons])
            text += f", skipped {self.skipped} malformed ({'first: ' if self.skipped > reasons else ''}{first})"
        if self.ignored:
            text += "; not used: " + "; ".join(f"{key} in {n} record{'s' * (n != 1)} (first: {self.ignored_first[key]})"
                                                for key, n in self.ignored.items())
        return text


class Raw:
    """A raw record: typed field access whose errors name the file, the record and the (dotted) field."""

    def __init__(self, path: str, ref: str | int, data: dict[str, Any], prefix: str = "",
                 notes: list[tuple[str, str]] | None = None):
        self.path, self.ref, self.data, self.prefix = path, ref, data, prefix
        self.notes = [] if notes is None else notes
        """``(field, why)`` of the fields read but not used (shared with the children)."""

    def ignore(self, name: str, why: str) -> None:
        self.notes.append((self.prefix + name, why))

    def sub(self, name: str, data: dict[str, Any]) -> Raw:
        """A nested object ``data`` found at field ``name`` (fields named ``<name>.<field>``)."""
        return Raw(self.path, self.ref, data, f"{self.prefix}{name}.", self.notes)

    def error(self, name: str, message: str) -> RecordError:
        return RecordError(self.path, self.ref, self.prefix + name, message)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise self.error(name, "missing")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(name, f"expected {names}, got {type(value).__name__} {short(value)}")
        return value

    def text(self, name: str, default: Any = ...) -> str:
        value = self.get(name, str, default)
        if isinstance(value, str) and not value.strip():
            raise self.error(name, "empty")
        return value

    def target(self, name: str) -> str:
        return self.text(name).strip()

    def texts(self, name: str, single_ok: bool = False) -> list[str]:
        """A list of non-empty strings (missing: empty list); ``single_ok`` also accepts one string."""
        value = self.get(name, (list, str) if single_ok else list, [])
        items = [value] if isinstance(value, str) else value
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.error(f"{name}[{i}]", f"expected str, got {type(item).__name__} {short(item)}")
            if not item.strip():
                raise self.error(f"{name}[{i}]", "empty")
        return list(items)

    def child(self, name: str) -> Raw:
        return self.sub(name, self.get(name, dict))


def short(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        text = reprlib.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_template(raw: Raw, name: str, template: str) -> None:
    try:
        slots = [(f, spec, conv) for _, f, spec, conv in Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise raw.error(name, f"template {template!r} has unbalanced braces ({e})") from None
    if slots != [("", "", None)]:  # a format spec or conversion ("{:>{}}", "{!r}") is no plain subject slot
        raise raw.error(name, f"template {template!r} must contain exactly one '{{}}' for the subject")


def check_prompt(raw: Raw, name: str, prompt: str) -> None:
    if prompt != prompt.rstrip():
        raise raw.error(name, f"prompt {prompt!r} ends with whitespace (the scorer adds the space before the target)")


def template_from_sentence(raw: Raw, prompt_field: str, prompt: str, subject: str) -> str:
    """The prompt with the first occurrence of the subject replaced by ``{}`` (other braces escaped)."""
    at = prompt.find(subject)
    if at < 0:
        raise raw.error("subject", f"{subject!r} does not occur in {prompt_field} {prompt!r}")

    def esc(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return esc(prompt[:at]) + "{}" + esc(prompt[at + len(subject) :])


ALIASES = "further answers (aliases) are not scored: a probe has one target"
UNKNOWN = "unknown field, not used"


def check_length(path: str, ref: str | int, name: str, text: str, max_chars: int) -> None:
    """A :class:`RecordError` when ``text`` (the field ``name``) is longer than ``max_chars`` characters."""
    if len(text) > max_chars:
        raise RecordError(path, ref, name, f"{len(text):,} characters, more than max_prompt_chars={max_chars:,} "
                                           "(raise max_prompt_chars if such long texts are intended)")


def _texts(rec: KnowledgeRecord) -> list[tuple[str, str]]:
    """(field, text) of every text of a record that ends up in a scored or edited prompt."""
    texts = [("subject", rec.subject), ("prompt", rec.prompt), ("target_new", rec.target_new),
             ("target_true", rec.target_true)]
    texts += [(f"paraphrases[{i}]", p) for i, p in enumerate(rec.paraphrases)]
    for i, n in enumerate(rec.neighborhood):
        texts += [(f"neighborhood[{i}].prompt", n.prompt), (f"neighborhood[{i}].target", n.target)]
    texts += [(f"generation_prompts[{i}]", p) for i, p in enumerate(rec.generation_prompts)]
    for i, q in enumerate(rec.portability):
        texts += [(f"portability[{i}].prompt", q.prompt), (f"portability[{i}].target", q.target)]
        texts += [(f"portability[{i}].alternative", q.alternative)] if q.alternative is not None else []
    return texts + [(f"augmentations[{i}]", a) for i, a in enumerate(rec.augmentations)]


def validate(raw: Raw, rec: KnowledgeRecord, max_chars: int) -> None:
    """Checks shared by every format, on the converted record."""
    for name, text in _texts(rec):
        check_length(raw.path, raw.ref, name, text, max_chars)
    check_template(raw, "prompt", rec.prompt)
    check_prompt(raw, "prompt", rec.prompt)
    if rec.subject != rec.subject.strip():
        raise raw.error("subject", f"{rec.subject!r} has surrounding whitespace")
    if rec.target_new.casefold() == rec.target_true.casefold():
        raise raw.error("target_new", f"equals target_true ({rec.target_true!r}): the edit would change nothing")
    for i, p in enumerate(rec.paraphrases):
        check_prompt(raw, f"paraphrases[{i}]", p)
    for i, n in enumerate(rec.neighborhood):
        check_prompt(raw, f"neighborhood[{i}].prompt", n.prompt)
    for i, q in enumerate(rec.portability):
        check_prompt(raw, f"portability[{i}].prompt", q.prompt)
    for i, a in enumerate(rec.augmentations):
        check_template(raw, f"augmentations[{i}]", a)
        check_prompt(raw, f"augmentations[{i}]", a)
        if a.format(rec.subject) in rec.paraphrases or a == rec.prompt:
            raise raw.error(f"augmentations[{i}]", f"{a!r} repeats the prompt or an evaluation paraphrase")
