"""Editing phrasings of a record that need no model: the record's own augmentations topped up from its
relation's templates (``record``), or the relation's templates alone (``relations``), each kept only when
:func:`allowed`. Paraphrase augmentation (:mod:`retention.callbacks.augmentation`) uses these, and so does the
analysis, which recomputes how many phrasings a run gave each fact.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from retention.data.relations import augmentation_phrasings, resembles
from retention.records import KnowledgeRecord

TEMPLATE_SOURCES = ("record", "relations")
"""The sources :func:`template_phrasings` serves (the ``model`` source samples a language model)."""


def normalised(template: str) -> str:
    """A template's words and ``{}`` in lower case, for comparing phrasings.

    >>> normalised("The Capital of {} is,")
    'the capital of {} is'
    """
    return " ".join(re.findall(r"\w+|\{\}", template.casefold()))


def allowed(record: KnowledgeRecord, template: str) -> bool:
    """Whether a phrasing may be used while editing: a one-``{}`` template unlike the record's own prompt and
    unlike every evaluation paraphrase."""
    if template.count("{}") != 1 or normalised(template) == normalised(record.prompt):
        return False
    return not any(resembles(template, record.subject, p) for p in record.paraphrases)


def kept_phrasings(record: KnowledgeRecord, candidates: Iterable[str], k: int) -> list[str]:
    """The first ``k`` :func:`allowed` candidates, without repeats (compared :func:`normalised`)."""
    kept: list[str] = []
    for t in candidates:
        if allowed(record, t) and normalised(t) not in {normalised(x) for x in kept}:
            kept.append(t)
    return kept[:k]


def template_phrasings(record: KnowledgeRecord, k: int, source: str = "record", seed: int = 0) -> list[str]:
    """Up to ``k`` phrasings of ``source`` (:data:`TEMPLATE_SOURCES`) for ``record``; a ``record`` source with
    too few relation templates keeps what it has, a ``relations`` one raises (KeyError, ValueError)."""
    if source not in TEMPLATE_SOURCES:
        raise ValueError(f"template phrasing source {source!r} unknown; choose from {', '.join(TEMPLATE_SOURCES)}")
    if k <= 0:
        return []
    if source == "record":
        candidates = list(record.augmentations)
        missing = k - sum(allowed(record, t) for t in candidates)
        if missing > 0:
            try:
                candidates += augmentation_phrasings(record, missing, seed)
            except (KeyError, ValueError):
                pass  # no (or too few) relation templates: the caller warns about short lists
    else:
        candidates = augmentation_phrasings(dataclasses.replace(record, augmentations=[]), k, seed)
    return kept_phrasings(record, candidates, k)
