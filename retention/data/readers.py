"""Read knowledge records from CounterFact, zsRE, the built-in set or our own record files.

The format is detected from the content, never from the file name:

- ``counterfact``: CounterFact in the ROME/MEMIT format (``requested_rewrite{prompt, subject, relation_id,
  target_new{str}, target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``generation_prompts``). Neighbourhood prompts given as plain strings expect the record's ``target_true``.
- ``easyedit``: EasyEdit's flat format (``prompt`` is a full sentence containing ``subject``, ``target_new``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``). The template is the
  prompt with the first occurrence of the subject replaced by ``{}``; the relation id is unknown (``""``).
- ``knowedit``: KnowEdit (EasyEdit's benchmark: ``subject``, ``prompt`` (or ``src``), ``target_new``,
  ``ground_truth`` (a string, a list of answers or a list of alias lists), ``rephrase``/``rephrase_prompt``,
  ``locality{<kind>: [{prompt, ground_truth}]}``, ``portability{<kind>: [{prompt, ground_truth}]}``). Rephrases
  are evaluation paraphrases, every locality prompt (``Relation_Specificity``, ``Forgetfulness``, ...) a
  neighbourhood prompt, every portability prompt (``Reasoning``, ``Subject_Aliasing``,
  ``Logical_Generalization``, ...) a ``portability`` probe expecting its ground truth (its alternative for
  ``prob`` is ``ground_truth`` when the answer is ``target_new``, else none). The first answer of a list is the
  target; further answers (aliases) are not scored and are counted as ignored. A record without
  ``ground_truth`` (Wiki_recent inserts facts the model never knew) or without ``subject`` (WikiBio edits
  passages) is malformed: a retention run needs the old answer. The flat EasyEdit format is read by the same
  code, so it also accepts ``portability_prompt``/``portability_ground_truth``.
- ``mquake``: MQuAKE (``requested_rewrite`` as a list of CounterFact-style rewrites, ``questions``,
  ``answer``, ``new_answer``). A case with exactly one rewrite is one record: the rewrite is the edit, its
  ``question`` an evaluation paraphrase, and each multi-hop question a ``portability`` probe expecting
  ``new_answer`` against ``answer``. A case with several rewrites is malformed here: its multi-hop questions are
  answered only when all of its rewrites are edited into one model, while records are selected, split and (in
  ``single`` and ``sequential`` mode) edited one by one. ``on_error="skip"`` keeps the single-rewrite cases.
  ``single_hops``, ``new_single_hops``, ``orig`` and the answer aliases are not scored (counted as ignored).
- ``zsre``: zsRE in the MEND format (``subject``, ``src``, ``rephrase``, ``alt``, ``answers``, ``loc``,
  ``loc_ans``). See :data:`ZSRE_TARGETS` for the two conventions for the new target. The neighbourhood
  prompt is ``loc`` (an ``"nq question: ..."`` string) with a ``?`` appended, expecting ``loc_ans``.
- ``records``: our own format, a list of :meth:`KnowledgeRecord.to_dict` objects (the built-in set).

Files are UTF-8 (a leading BOM is dropped), a JSON array of records or JSONL (one JSON object per line), or a
Parquet, CSV or Arrow table read through ``datasets`` (``pip install 'retention[hf]'``; null values are absent
fields). ``hf:<dataset id>[:config]`` reads the ``train`` split of a Hugging Face dataset the same way (the
``datasets`` extra and a reachable hub, checked first; with ``HF_DATASETS_OFFLINE`` set, its local cache). Targets
are stripped of surrounding whitespace (the scorer adds the leading space itself). A malformed record, or a text
longer than ``max_prompt_chars``, raises :class:`RecordError` naming the file, the record and the field;
``on_error="skip"`` skips it and counts it in the :class:`ReadReport` instead. Errors of the file itself (not
UTF-8, invalid JSON array, no records) always raise. A field of a KnowEdit, EasyEdit or MQuAKE record that is
not used (an alias, an unknown key) is never dropped silently: :attr:`ReadReport.ignored` counts the records per
field, and the log names the file, the first such record and the field.

The file helpers here (:func:`read_text`, :func:`parse_jsonl`, :class:`ReadReport`) serve the task readers too
(``retention.data.tasks.sources``), so both decode, split and skip the same way.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import reprlib
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from string import Formatter
from typing import Any

from retention.corpus import (
    HF_PREFIX,
    TABLE_SUFFIXES,
    corpus_problem,
    import_datasets,
    read_hub_records,
    read_table_records,
)
from retention.records import KnowledgeRecord, NeighborhoodPrompt, PortabilityPrompt, RecordError

log = logging.getLogger(__name__)

BUILTIN_SETS = {"builtin": "builtin_facts.json"}
"""Names of knowledge sets shipped in ``retention/resources``."""

ZSRE_TARGETS = {
    "alt": "EasyEdit's convention: target_new = alt (a wrong answer), target_true = answers[0]",
    "answers0": "ROME's convention: target_new = answers[0] (the correct answer is edited in), "
    "target_true = alt (only the alternative for the 'prob' protocol, not a fact the model knows)",
}
"""Conventions for the new target of zsRE records."""

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


class _Raw:
    """A raw record: typed field access whose errors name the file, the record and the (dotted) field."""

    def __init__(self, path: str, ref: str | int, data: dict[str, Any], prefix: str = "",
                 notes: list[tuple[str, str]] | None = None):
        self.path, self.ref, self.data, self.prefix = path, ref, data, prefix
        self.notes = [] if notes is None else notes
        """``(field, why)`` of the fields read but not used (shared with the children)."""

    def ignore(self, name: str, why: str) -> None:
        self.notes.append((self.prefix + name, why))

    def sub(self, name: str, data: dict[str, Any]) -> _Raw:
        """A nested object ``data`` found at field ``name`` (fields named ``<name>.<field>``)."""
        return _Raw(self.path, self.ref, data, f"{self.prefix}{name}.", self.notes)

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
            raise self.error(name, f"expected {names}, got {type(value).__name__} {_short(value)}")
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
                raise self.error(f"{name}[{i}]", f"expected str, got {type(item).__name__} {_short(item)}")
            if not item.strip():
                raise self.error(f"{name}[{i}]", "empty")
        return list(items)

    def child(self, name: str) -> _Raw:
        return self.sub(name, self.get(name, dict))


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        text = reprlib.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_template(raw: _Raw, name: str, template: str) -> None:
    try:
        slots = [(f, spec, conv) for _, f, spec, conv in Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise raw.error(name, f"template {template!r} has unbalanced braces ({e})") from None
    if slots != [("", "", None)]:  # a format spec or conversion ("{:>{}}", "{!r}") is no plain subject slot
        raise raw.error(name, f"template {template!r} must contain exactly one '{{}}' for the subject")


def _check_prompt(raw: _Raw, name: str, prompt: str) -> None:
    if prompt != prompt.rstrip():
        raise raw.error(name, f"prompt {prompt!r} ends with whitespace (the scorer adds the space before the target)")


def _template_from_sentence(raw: _Raw, prompt_field: str, prompt: str, subject: str) -> str:
    """The prompt with the first occurrence of the subject replaced by ``{}`` (other braces escaped)."""
    at = prompt.find(subject)
    if at < 0:
        raise raw.error("subject", f"{subject!r} does not occur in {prompt_field} {prompt!r}")

    def esc(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return esc(prompt[:at]) + "{}" + esc(prompt[at + len(subject) :])


def _from_counterfact(raw: _Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    rw = raw.child("requested_rewrite")
    target_true = rw.child("target_true").target("str")
    neighborhood = []
    for i, item in enumerate(raw.get("neighborhood_prompts", list, [])):
        name = f"neighborhood_prompts[{i}]"
        if isinstance(item, str) and item.strip():
            neighborhood.append(NeighborhoodPrompt(item, target_true))
        elif isinstance(item, dict):
            n = _Raw(raw.path, raw.ref, item, name + ".")
            neighborhood.append(NeighborhoodPrompt(n.text("prompt"), n.target("target")))
        else:
            raise raw.error(name, f"expected a non-empty str or {{prompt, target}}, got {_short(item)}")
    return KnowledgeRecord(
        case_id=case_id,
        subject=rw.text("subject"),
        prompt=rw.text("prompt"),
        relation_id=rw.get("relation_id", str, ""),
        target_new=rw.child("target_new").target("str"),
        target_true=target_true,
        paraphrases=raw.texts("paraphrase_prompts"),
        neighborhood=neighborhood,
        generation_prompts=raw.texts("generation_prompts"),
        source="counterfact",
    )


_ALIASES = "further answers (aliases) are not scored: a probe has one target"
_UNKNOWN = "unknown field, not used"


def _answer(raw: _Raw, name: str) -> str:
    """The answer of a ground-truth field: a string, a list of answers or a list of alias lists (KnowEdit). The
    first answer is the target; further ones are counted as ignored."""
    value = raw.get(name, (str, list))
    if isinstance(value, str):
        return raw.target(name)
    flat = [a for group in value for a in group] if value and all(isinstance(v, list) for v in value) else value
    if not flat:
        raise raw.error(name, "empty list")
    if not all(isinstance(a, str) and a.strip() for a in flat):
        raise raw.error(name, f"expected answers (non-empty strings or lists of them), got {_short(value)}")
    if len(flat) > 1:
        raw.ignore(name, _ALIASES)
    return flat[0].strip()


def _prompt_answer_items(raw: _Raw, name: str) -> list[tuple[list[str], str]]:
    """``(prompts, answer)`` of each ``{prompt, ground_truth}`` of a KnowEdit ``locality`` or ``portability``
    mapping (``{<kind>: [items]}``; a kind whose value is null, as in KnowEdit's parquet files, has none)."""
    if raw.data.get(name) is None:
        return []
    kinds = raw.child(name)
    out = []
    for kind, items in kinds.data.items():
        if items is None:
            continue
        if not isinstance(items, list):
            raise kinds.error(kind, f"expected a list of {{prompt, ground_truth}}, got {_short(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise kinds.error(f"{kind}[{i}]", f"expected {{prompt, ground_truth}}, got {_short(item)}")
            entry = kinds.sub(f"{kind}[{i}]", item)
            if not entry.has("prompt"):
                raise entry.error("prompt", "missing")
            for extra in sorted(set(item) - {"prompt", "ground_truth"}):
                entry.ignore(extra, _UNKNOWN)
            prompts = entry.texts("prompt", single_ok=True)
            for j, prompt in enumerate(prompts):
                _check_prompt(entry, "prompt" if isinstance(item["prompt"], str) else f"prompt[{j}]", prompt)
            out.append((prompts, _answer(entry, "ground_truth")))
    return out


def _pairs(raw: _Raw, prompts_name: str, answers_name: str) -> list[tuple[str, str]]:
    """Flat EasyEdit ``<x>_prompt`` and ``<x>_ground_truth`` (a string or a list each), paired up."""
    prompts = raw.texts(prompts_name, single_ok=True)
    answers = [t.strip() for t in raw.texts(answers_name, single_ok=True)]
    if len(prompts) != len(answers):
        raise raw.error(answers_name, f"{len(answers)} answer(s) for {len(prompts)} {prompts_name}(s); they must pair up")
    return list(zip(prompts, answers))


_EASYEDIT_FIELDS = {
    "case_id", "subject", "prompt", "src", "relation_id", "target_new", "ground_truth", "rephrase",
    "rephrase_prompt", "locality_prompt", "locality_ground_truth", "portability_prompt",
    "portability_ground_truth", "locality", "portability",
}  # fmt: skip


def _from_easyedit(raw: _Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    """EasyEdit's flat records and KnowEdit's (nested ``locality``/``portability``), read by one converter."""
    if not raw.has("subject") and raw.has("concept"):
        raise raw.error("subject", "missing: a WikiBio record (text, labels, concept) edits a passage, not a fact "
                                   "with an old and a new answer")
    if not raw.has("ground_truth"):
        raise raw.error("ground_truth", "missing: the old answer is what the edit replaces (the 'prob' alternative, "
                                        "and what a control fact is measured against); KnowEdit's Wiki_recent "
                                        "inserts facts without one, which this measurement cannot use")
    prompt_field = "src" if raw.has("src") and not raw.has("prompt") else "prompt"
    if prompt_field == "prompt" and raw.has("src"):
        raw.ignore("src", "prompt is used")
    subject, prompt = raw.text("subject"), raw.text(prompt_field)
    target_new, target_true = raw.target("target_new"), _answer(raw, "ground_truth")
    paraphrases = raw.texts("rephrase_prompt", single_ok=True) + raw.texts("rephrase", single_ok=True)
    neighborhood = [NeighborhoodPrompt(p, t) for p, t in _pairs(raw, "locality_prompt", "locality_ground_truth")]
    neighborhood += [NeighborhoodPrompt(p, t) for ps, t in _prompt_answer_items(raw, "locality") for p in ps]
    portable = _pairs(raw, "portability_prompt", "portability_ground_truth")
    portable += [(p, t) for ps, t in _prompt_answer_items(raw, "portability") for p in ps]
    for name in sorted(set(raw.data) - _EASYEDIT_FIELDS):
        raw.ignore(name, _UNKNOWN)
    return KnowledgeRecord(
        case_id=case_id,
        subject=subject,
        prompt=_template_from_sentence(raw, prompt_field, prompt, subject),
        relation_id=raw.get("relation_id", str, ""),
        target_new=target_new,
        target_true=target_true,
        paraphrases=list(dict.fromkeys(paraphrases)),
        neighborhood=neighborhood,
        # An answer that is the new target (Subject_Aliasing) has the old answer as its alternative.
        portability=[PortabilityPrompt(p, t, target_true if t.casefold() == target_new.casefold() else None)
                     for p, t in portable],
        source="knowedit" if raw.has("locality") or raw.has("portability") else "easyedit",
    )


_SINGLE_HOPS = ("single-hop questions are not scored: the edited hop is requested_rewrite[0].question (read as a "
                "paraphrase), the others ask about other facts of the chain")
_MQUAKE_IGNORED = {"answer_alias": _ALIASES, "new_answer_alias": _ALIASES, "single_hops": _SINGLE_HOPS,
                   "new_single_hops": _SINGLE_HOPS, "orig": "the case's triples are metadata, not prompts"}
_MQUAKE_FIELDS = {"case_id", "requested_rewrite", "questions", "answer", "new_answer", *_MQUAKE_IGNORED}
_REWRITE_FIELDS = {"prompt", "subject", "relation_id", "target_new", "target_true", "question"}


def _from_mquake(raw: _Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    rewrites = raw.get("requested_rewrite", list)
    if len(rewrites) != 1:
        raise raw.error("requested_rewrite", "empty list" if not rewrites else (
            f"{len(rewrites)} rewrites: a multi-hop case is answered only when all of its rewrites are edited into "
            "one model, but records are selected, split and edited one by one (one rewrite each); "
            "on_error='skip' keeps the single-rewrite cases"))
    if not isinstance(rewrites[0], dict):
        raise raw.error("requested_rewrite[0]", f"expected an object, got {_short(rewrites[0])}")
    rw = raw.sub("requested_rewrite[0]", rewrites[0])
    target_new, target_true = rw.child("target_new").target("str"), rw.child("target_true").target("str")
    new_answer, answer = raw.target("new_answer"), raw.target("answer")
    if not raw.has("questions"):
        raise raw.error("questions", "missing")
    questions = raw.texts("questions")
    for name in sorted(set(rw.data) - _REWRITE_FIELDS):
        rw.ignore(name, _UNKNOWN)
    for name in sorted(set(raw.data) - {"case_id", "requested_rewrite", "questions", "answer", "new_answer"}):
        raw.ignore(name, _MQUAKE_IGNORED.get(name, _UNKNOWN))
    alternative = answer if answer.casefold() != new_answer.casefold() else None
    return KnowledgeRecord(
        case_id=case_id,
        subject=rw.text("subject"),
        prompt=rw.text("prompt"),
        relation_id=rw.get("relation_id", str, ""),
        target_new=target_new,
        target_true=target_true,
        paraphrases=rw.texts("question", single_ok=True),
        portability=[PortabilityPrompt(q, new_answer, alternative) for q in questions],
        source="mquake",
    )


def _from_zsre(raw: _Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    subject, src = raw.text("subject"), raw.text("src")
    answers = raw.texts("answers")
    if not answers:
        raise raw.error("answers", "empty list")
    alt = raw.target("alt")
    answer = answers[0].strip()
    target_new, target_true = (alt, answer) if zsre_target == "alt" else (answer, alt)
    neighborhood = []
    if raw.has("loc") or raw.has("loc_ans"):
        loc = raw.text("loc").rstrip()
        neighborhood.append(NeighborhoodPrompt(loc if loc.endswith("?") else loc + "?", raw.target("loc_ans")))
    return KnowledgeRecord(
        case_id=case_id,
        subject=subject,
        prompt=_template_from_sentence(raw, "src", src, subject),
        relation_id="",
        target_new=target_new,
        target_true=target_true,
        paraphrases=raw.texts("rephrase", single_ok=True),
        neighborhood=neighborhood,
        source="zsre",
    )


_OWN_FIELDS = {f.name for f in fields(KnowledgeRecord)}


def _from_records(raw: _Raw, case_id: str, zsre_target: str) -> KnowledgeRecord:
    unknown = sorted(set(raw.data) - _OWN_FIELDS)
    if unknown:
        raise raw.error(unknown[0], f"unknown field (known: {', '.join(sorted(_OWN_FIELDS))})")
    neighborhood = []
    for i, item in enumerate(raw.get("neighborhood", list, [])):
        if not isinstance(item, dict):
            raise raw.error(f"neighborhood[{i}]", f"expected {{prompt, target}}, got {_short(item)}")
        n = _Raw(raw.path, raw.ref, item, f"neighborhood[{i}].")
        extra = sorted(set(item) - {"prompt", "target"})
        if extra:
            raise n.error(extra[0], "unknown field (known: prompt, target)")
        neighborhood.append(NeighborhoodPrompt(n.text("prompt"), n.target("target")))
    portability = []
    for i, item in enumerate(raw.get("portability", list, [])):
        if not isinstance(item, dict):
            raise raw.error(f"portability[{i}]", f"expected {{prompt, target, alternative}}, got {_short(item)}")
        q = _Raw(raw.path, raw.ref, item, f"portability[{i}].")
        extra = sorted(set(item) - {"prompt", "target", "alternative"})
        if extra:
            raise q.error(extra[0], "unknown field (known: prompt, target, alternative)")
        alternative = q.target("alternative") if item.get("alternative") is not None else None
        portability.append(PortabilityPrompt(q.text("prompt"), q.target("target"), alternative))
    return KnowledgeRecord(
        case_id=case_id,
        subject=raw.text("subject"),
        prompt=raw.text("prompt"),
        relation_id=raw.get("relation_id", str, ""),
        target_new=raw.target("target_new"),
        target_true=raw.target("target_true"),
        paraphrases=raw.texts("paraphrases"),
        neighborhood=neighborhood,
        generation_prompts=raw.texts("generation_prompts"),
        augmentations=raw.texts("augmentations"),
        source=raw.get("source", str, ""),
        portability=portability,
    )


# Detection: the first key of each signature that a record has decides its file's format.
_FORMATS = {
    "mquake": (("new_answer", "questions"), _from_mquake),
    "counterfact": (("requested_rewrite",), _from_counterfact),
    "zsre": (("src", "alt", "answers"), _from_zsre),
    "records": (("target_true",), _from_records),
    "knowedit": (("portability", "locality"), _from_easyedit),
    "easyedit": (("ground_truth",), _from_easyedit),
}


def _record_format(item: Any) -> str | None:
    if isinstance(item, dict):
        for name, (keys, _) in _FORMATS.items():
            if any(k in item for k in keys):
                return name
    return None


def _detect(path: str, items: list[tuple[int | str, Any]]) -> str:
    """The format most records have (the earliest of a tie), so a malformed first record cannot decide it."""
    votes: dict[str, int] = {}
    for _, item in items:
        name = _record_format(item)
        if name is not None:
            votes[name] = votes.get(name, 0) + 1
    if votes:
        return max(votes, key=lambda name: votes[name])  # max keeps the first of equal counts
    hints = "; ".join(f"{name}: {', '.join(keys)}" for name, (keys, _) in _FORMATS.items())
    raise RecordError(path, "-", "<format>", f"no record has a key that tells the format ({hints})")


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


def _validate(raw: _Raw, rec: KnowledgeRecord, max_chars: int) -> None:
    """Checks shared by every format, on the converted record."""
    for name, text in _texts(rec):
        check_length(raw.path, raw.ref, name, text, max_chars)
    _check_template(raw, "prompt", rec.prompt)
    _check_prompt(raw, "prompt", rec.prompt)
    if rec.subject != rec.subject.strip():
        raise raw.error("subject", f"{rec.subject!r} has surrounding whitespace")
    if rec.target_new.casefold() == rec.target_true.casefold():
        raise raw.error("target_new", f"equals target_true ({rec.target_true!r}): the edit would change nothing")
    for i, p in enumerate(rec.paraphrases):
        _check_prompt(raw, f"paraphrases[{i}]", p)
    for i, n in enumerate(rec.neighborhood):
        _check_prompt(raw, f"neighborhood[{i}].prompt", n.prompt)
    for i, q in enumerate(rec.portability):
        _check_prompt(raw, f"portability[{i}].prompt", q.prompt)
    for i, a in enumerate(rec.augmentations):
        _check_template(raw, f"augmentations[{i}]", a)
        _check_prompt(raw, f"augmentations[{i}]", a)
        if a.format(rec.subject) in rec.paraphrases or a == rec.prompt:
            raise raw.error(f"augmentations[{i}]", f"{a!r} repeats the prompt or an evaluation paraphrase")


def _resolve(path_or_name: str | Path) -> tuple[str, str]:
    """(display path, text) of a file or a built-in set name."""
    name = str(path_or_name)
    path = Path(name).expanduser()
    if path.is_file():
        display, data = str(path), path.read_bytes()
    elif name in BUILTIN_SETS and not path.exists():
        res = resources.files("retention") / "resources" / BUILTIN_SETS[name]
        display, data = f"<{name}>", res.read_bytes()
    elif path.is_dir():
        raise IsADirectoryError(f"{name}: is a folder; give a JSON or JSONL file of knowledge records")
    else:
        raise FileNotFoundError(
            f"{name}: no such file, and not a built-in knowledge set (built-in: {', '.join(BUILTIN_SETS)})"
        )
    return display, decode_text(data, display)


def decode_text(data: bytes, path: str) -> str:
    """The text of a data file's bytes: UTF-8, a leading BOM dropped; else a :class:`RecordError` naming the
    file, the line and the byte offset."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise RecordError(path, f"line {line}", "<file>",
                          f"not UTF-8 text: byte {at} (0x{data[at]:02x}): {e.reason}; save the file as UTF-8") from None


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 data file (see :func:`decode_text`)."""
    return decode_text(Path(path).read_bytes(), str(path))


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """Lines split at ``\\n``, ``\\r\\n`` and ``\\r`` only (``str.splitlines`` also splits at U+2028 and
    other characters a JSON string may hold unescaped)."""
    lines = _LINE_BREAK.split(text)
    return lines[:-1] if lines and not lines[-1] else lines


def load_json(text: str) -> Any:
    """``json.loads``, whose every failure (also too deep nesting, too long an integer) is a JSONDecodeError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as e:
        raise json.JSONDecodeError(str(e) or type(e).__name__, text, 0) from None


def json_error(path: str, err: json.JSONDecodeError, line: int | None = None) -> RecordError:
    """The :class:`RecordError` of invalid JSON at ``line`` (default: the error's own line)."""
    return RecordError(path, f"line {line or err.lineno}", "<json>", f"invalid JSON: {err.msg} (column {err.colno})")


def parse_jsonl(path: str, text: str, report: ReadReport) -> list[tuple[int, int, Any]]:
    """``(record number, line number, value)`` of each non-blank line of JSONL text (record numbers count the
    non-blank lines from 0); an invalid line goes to ``report.reject``."""
    items = []
    for lineno, line in enumerate(split_lines(text), 1):
        if not line.strip():
            continue
        number = len(items) + report.skipped
        try:
            items.append((number, lineno, load_json(line)))
            continue
        except json.JSONDecodeError as e:
            err = json_error(path, e, lineno)
        report.reject(err)
    return items


def _parse(path: str, text: str, report: ReadReport) -> list[tuple[int | str, Any]]:
    """(index, raw item) pairs of a JSON array, a single JSON object or JSONL."""
    if not text.strip():
        raise RecordError(path, "-", "<file>", "empty file, no records")
    try:
        top = load_json(text)
    except json.JSONDecodeError as e:
        if _is_jsonl(text):
            return [(number, item) for number, _, item in parse_jsonl(path, text, report)]
        raise json_error(path, e) from None
    if isinstance(top, dict):
        return [(0, top)]
    if not isinstance(top, list):
        raise RecordError(path, "-", "<file>", f"expected a JSON array of records, got {type(top).__name__}")
    return list(enumerate(top))


def _is_jsonl(text: str) -> bool:
    """Whether text that is not one JSON value is JSONL: its first line is JSON, or any line is a JSON object
    (so a malformed first line is one bad record, not a verdict on the file)."""
    lines = [line for line in split_lines(text) if line.strip()]
    return _json_value(lines[0]) is not _NOT_JSON or any(isinstance(_json_value(line), dict) for line in lines)


_NOT_JSON = object()


def _json_value(line: str) -> Any:
    """The JSON value of a line, or ``_NOT_JSON``."""
    try:
        return load_json(line)
    except json.JSONDecodeError:
        return _NOT_JSON


def _table_items(path: str) -> list[tuple[int | str, Any]]:
    """(index, row) of a Parquet/CSV/Arrow file (through ``datasets``; KnowEdit's hub files are Parquet). A null
    column value is an absent field: a table has every column in every row."""
    return [(i, {k: v for k, v in row.items() if v is not None}) for i, (_, row) in enumerate(read_table_records(path))]


def _hub_items(spec: str) -> list[tuple[int | str, Any]]:
    """(index, record) of the ``train`` split of the Hugging Face dataset ``hf:<id>[:config]``; an ImportError
    (``datasets`` missing) or a FileNotFoundError (hub unreachable, no such dataset) naming ``spec`` and the fix."""
    import_datasets(f"knowledge source {spec}")
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):  # offline: the local cache may serve it
        problem = corpus_problem(f"{HF_PREFIX}{name}", "knowledge source")
        if problem is not None:
            raise FileNotFoundError(f"{spec}: {problem[0]}; {problem[1]}")
    try:
        return [(i, record) for i, (_, record) in enumerate(read_hub_records(f"{HF_PREFIX}{name}", config or None,
                                                                              "train"))]
    except Exception as err:  # datasets raises its own types (DatasetNotFoundError, ConnectionError, ...)
        raise FileNotFoundError(f"{spec}: the dataset's train split could not be read ({type(err).__name__}: "
                                f"{err}); give hf:<dataset id>[:config] or a JSON/JSONL file") from None


def read_records(
    path_or_name: str | Path,
    on_error: str = "raise",
    limit: int | None = None,
    zsre_target: str = "alt",
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> tuple[list[KnowledgeRecord], ReadReport]:
    """Read knowledge records and a :class:`ReadReport` of what was read and skipped.

    ``path_or_name`` is a file or the name of a built-in set (``"builtin"``); ``on_error`` is ``"raise"``
    or ``"skip"``; ``limit`` keeps the first N good records; ``zsre_target`` names the zsRE convention;
    ``max_prompt_chars`` is the longest text of a record (prompt, subject, target, ...), in characters.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: choose from {', '.join(ON_ERROR)}")
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(f"zsre_target={zsre_target!r}: choose from {', '.join(ZSRE_TARGETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}: must be >= 0")
    if max_prompt_chars < 1:
        raise ValueError(f"max_prompt_chars={max_prompt_chars}: must be >= 1")
    t0 = time.perf_counter()
    if str(path_or_name).startswith(HF_PREFIX):
        path = str(path_or_name)
        report = ReadReport(path, on_error=on_error)
        items = _hub_items(path)
    elif Path(str(path_or_name)).suffix in TABLE_SUFFIXES and Path(path_or_name).expanduser().is_file():
        path = str(Path(path_or_name).expanduser())
        report = ReadReport(path, on_error=on_error)
        items = _table_items(path)
    else:
        path, text = _resolve(path_or_name)
        report = ReadReport(path, on_error=on_error)
        items = _parse(path, text, report)
    if not items and not report.skipped:
        raise RecordError(path, "-", "<file>", "no records")
    report.format = _detect(path, items) if items else ""
    convert = _FORMATS[report.format][1] if items else None
    records: list[KnowledgeRecord] = []
    seen: set[str] = set()
    for index, item in items:
        if limit is not None and len(records) >= limit:
            break
        try:
            rec, raw = _convert(path, index, item, convert, zsre_target, seen, max_prompt_chars)
        except RecordError as err:
            report.reject(err)
            continue
        for name, why in raw.notes:
            report.ignore(path, raw.ref, name, why)
        seen.add(rec.case_id)
        records.append(rec)
    report.read, report.seconds = len(records), time.perf_counter() - t0
    (log.warning if report.skipped or report.ignored else log.info)(report.summary())
    return records, report


def _convert(path, index, item, convert, zsre_target: str, seen: set[str], max_chars: int,
             ) -> tuple[KnowledgeRecord, _Raw]:
    if not isinstance(item, dict):
        raise RecordError(path, index, "<record>", f"expected a JSON object, got {type(item).__name__}")
    cid = item.get("case_id", index)
    raw = _Raw(path, index if "case_id" not in item else f"{index} (case_id {_short(cid)})", item)
    if not isinstance(cid, (int, str)) or isinstance(cid, bool) or str(cid).strip() == "":
        raise raw.error("case_id", f"expected a non-empty int or str, got {_short(cid)}")
    if str(cid) in seen:
        raise raw.error("case_id", f"duplicate case_id {_short(cid)}")
    rec = convert(raw, str(cid), zsre_target)
    _validate(raw, rec, max_chars)
    return rec, raw


def load_records(
    path_or_name: str | Path,
    on_error: str = "raise",
    limit: int | None = None,
    zsre_target: str = "alt",
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> list[KnowledgeRecord]:
    """Knowledge records of a file or built-in set (see :func:`read_records`; skipped records are logged)."""
    return read_records(path_or_name, on_error=on_error, limit=limit, zsre_target=zsre_target,
                        max_prompt_chars=max_prompt_chars)[0]
