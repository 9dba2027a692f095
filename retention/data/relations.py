"""Relation templates keyed by Wikidata relation id, and augmentation phrasings drawn from them.

One table (``retention/resources/relations.yaml``) serves CounterFact's 34 relations and the built-in set's
12 (seven ids are in both). Each relation has a main template and at least five more phrasings, written for
this project; every template holds one ``{}`` for the subject and ends right before the object. Where the
built-in set uses a relation, its templates come first (the built-in records draw from them; see
:mod:`retention.data.builtin_facts`). Augmentation phrasings (paraphrase augmentation while editing, Wen &
Zhang 2025) are drawn from a record's relation, never from its evaluation paraphrases.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from importlib import resources

import yaml

from retention.records import KnowledgeRecord

RELATIONS_RESOURCE = "relations.yaml"


@dataclass(frozen=True)
class Relation:
    id: str
    """Wikidata property id, e.g. ``"P36"``."""
    name: str
    templates: tuple[str, ...]
    """The main template first, then the other phrasings."""


def load_resource(name: str):
    """A YAML file of ``retention/resources``, read through importlib.resources (so a wheel install works)."""
    text = (resources.files("retention") / "resources" / name).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _load_relations() -> dict[str, Relation]:
    return {
        rid: Relation(rid, row["name"], tuple(row["templates"]))
        for rid, row in load_resource(RELATIONS_RESOURCE).items()
    }


RELATIONS: dict[str, Relation] = _load_relations()


def relation_templates(relation_id: str) -> list[str]:
    """The templates of a relation, main template first."""
    if relation_id not in RELATIONS:
        raise KeyError(
            f"no templates for relation id {relation_id!r} (known: {', '.join(sorted(RELATIONS))})"
        )
    return list(RELATIONS[relation_id].templates)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _around_subject(prompt: str, subject: str) -> tuple[list[str], list[str]] | None:
    """Words before the subject (in its sentence) and after it; None when the subject is absent."""
    at = prompt.rfind(subject)
    if at < 0:
        return None
    before = re.split(r"[.!?\n]\s", prompt[:at])[-1]
    return _words(before), _words(prompt[at + len(subject) :])


def resembles(template: str, subject: str, prompt: str) -> bool:
    """Whether ``template`` filled with ``subject`` says what the full ``prompt`` says.

    Compares the words around the subject (unrelated leading sentences, as in CounterFact's paraphrases,
    are cut off): equal, one a contiguous part of the other, or similar (difflib ratio >= 0.7).
    """
    filled = template.format(subject)
    ours, theirs = _around_subject(filled, subject), _around_subject(prompt, subject)
    if theirs is None:
        a, b = _words(filled), _words(prompt)
    else:
        (a_pre, a_post), (b_pre, b_post) = ours, theirs
        a = a_pre + ["\0"] + a_post
        b = b_pre[-(len(a_pre) + 1) :] + ["\0"] + b_post
    sa, sb = f" {' '.join(a)} ", f" {' '.join(b)} "
    return sa in sb or sb in sa or SequenceMatcher(None, a, b, autojunk=False).ratio() >= 0.7


def augmentation_phrasings(record: KnowledgeRecord, k: int, seed: int = 0) -> list[str]:
    """``k`` templates of the record's relation for editing, seeded per record.

    Excluded: the record's own template, templates that resemble any of its evaluation paraphrases and its
    existing augmentations. Raises when the relation has fewer than ``k`` such templates.
    """
    if k < 0:
        raise ValueError(f"k={k}: must be >= 0")
    if k == 0:
        return []
    try:
        templates = relation_templates(record.relation_id)
    except KeyError as e:
        raise KeyError(f"record {record.case_id}: {e.args[0]}") from None
    own = " ".join(_words(record.prompt))
    candidates = [
        t for t in templates
        if " ".join(_words(t)) != own
        and t not in record.augmentations
        and not any(resembles(t, record.subject, p) for p in record.paraphrases)
    ]  # fmt: skip
    if len(candidates) < k:
        raise ValueError(
            f"record {record.case_id} ({record.relation_id}): only {len(candidates)} template(s) differ from its "
            f"prompt and evaluation paraphrases, {k} requested"
        )
    return random.Random(f"{seed}:{record.case_id}").sample(candidates, k)
