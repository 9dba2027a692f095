"""Relation-template table and augmentation phrasings."""

from __future__ import annotations

from importlib import resources
from string import Formatter

import pytest
import yaml
from conftest import DATA, needs_data

from retention.data.builtin_facts import RELATIONS as BUILTIN_RELATIONS
from retention.data.readers import load_records
from retention.data.relations import (
    RELATIONS,
    RELATIONS_RESOURCE,
    augmentation_phrasings,
    relation_templates,
    resembles,
)
from retention.records import KnowledgeRecord

CF_ROME = DATA / "counterfact" / "counterfact_preknown.json"
COUNTERFACT_RELATIONS = (
    "P17 P19 P20 P27 P30 P36 P37 P39 P101 P103 P106 P108 P127 P131 P136 P138 P140 P159 P176 P178 P190 P264 "
    "P276 P364 P407 P413 P449 P463 P495 P641 P740 P937 P1303 P1412"
).split()


def record(**kw) -> KnowledgeRecord:
    base = dict(case_id="1", subject="Danielle Darrieux", prompt="The mother tongue of {} is", relation_id="P103",
                target_new="English", target_true="French",
                paraphrases=["Some text. Danielle Darrieux, a native", "Other text. Danielle Darrieux spoke the language"])
    return KnowledgeRecord(**{**base, **kw})


def test_table_covers_the_34_counterfact_relations():
    assert len(COUNTERFACT_RELATIONS) == 34 and set(COUNTERFACT_RELATIONS) <= set(RELATIONS)


def test_every_template_is_well_formed():
    for rid, rel in RELATIONS.items():
        assert rel.id == rid and len(rel.templates) >= 6, rid
        assert len(set(rel.templates)) == len(rel.templates), rid
        for t in rel.templates:
            assert [f for _, f, _, _ in Formatter().parse(t) if f is not None] == [""], t
            assert t == t.strip() and not t.endswith(("{}", ".")), t  # the prompt ends right before the object
        assert relation_templates(rid) == list(rel.templates)


def test_one_template_table_per_relation_id():
    """The resource has each relation id once (YAML would let a repeated key replace the first silently), and
    the built-in set's templates are a prefix of that one table, not a second table for the same id."""

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
            return super().construct_mapping(node, deep)

    text = (resources.files("retention") / "resources" / RELATIONS_RESOURCE).read_text(encoding="utf-8")
    assert set(yaml.load(text, Loader=UniqueKeys)) == set(RELATIONS)
    builtin_ids = [rel.relation_id for rel in BUILTIN_RELATIONS]
    assert len(builtin_ids) == len(set(builtin_ids))
    assert set(RELATIONS) == set(COUNTERFACT_RELATIONS) | set(builtin_ids)
    for rel in BUILTIN_RELATIONS:
        assert relation_templates(rel.relation_id)[: len(rel.templates)] == list(rel.templates), rel.relation_id
        assert RELATIONS[rel.relation_id].name == rel.name
    # ids of both sets: the built-in main template (the one the shipped records are built from) leads
    assert set(builtin_ids) & set(COUNTERFACT_RELATIONS) == {"P17", "P30", "P36", "P37", "P176", "P641", "P1303"}
    assert relation_templates("P36")[:2] == ["The capital city of {} is", "The capital of {} is"]
    assert "{} is governed from" in relation_templates("P36")  # CounterFact's phrasings stay in the table


def test_unknown_relation():
    with pytest.raises(KeyError, match="no templates for relation id 'P9999'"):
        relation_templates("P9999")
    with pytest.raises(KeyError, match="record 1: no templates for relation id ''"):
        augmentation_phrasings(record(relation_id=""), k=1)


def test_resembles():
    para = "Shayna does this and Yossel goes still and dies. Danielle Darrieux spoke the language"
    assert resembles("{} spoke the language of", "Danielle Darrieux", para)
    assert resembles("{} spoke the language", "Danielle Darrieux", para)
    assert not resembles("{}'s first language is", "Danielle Darrieux", para)
    assert resembles("{} is produced by", "Renault 8", "Renault 8, produced by")
    assert not resembles("The manufacturer of {} is", "Renault 8", "Renault 8, produced by")
    # zsRE-style paraphrase without the exact subject: whole prompts are compared
    assert resembles("What is the product of {}?", "UniFirst", "What will be the product of Unifirst Corp?")


def test_augmentation_is_seeded_and_avoids_prompt_and_paraphrases():
    r = record()
    picks = augmentation_phrasings(r, k=3, seed=0)
    assert len(picks) == 3 == len(set(picks))
    assert picks == augmentation_phrasings(r, k=3, seed=0)
    assert {tuple(augmentation_phrasings(r, k=3, seed=s)) for s in range(10)} != {tuple(picks)}
    assert r.prompt not in picks and set(picks) <= set(relation_templates("P103"))
    assert "{} spoke the language" not in augmentation_phrasings(record(prompt="{} natively speaks"), k=5, seed=1)
    assert augmentation_phrasings(r, k=0) == []


def test_augmentation_not_enough_templates():
    with pytest.raises(ValueError, match=r"record 1 \(P103\): only \d template\(s\) .* 8 requested"):
        augmentation_phrasings(record(), k=8)
    with pytest.raises(ValueError, match="k=-1"):
        augmentation_phrasings(record(), k=-1)


@needs_data
def test_counterfact_relations_and_augmentation_never_an_evaluation_paraphrase():
    records = load_records(CF_ROME)
    assert {r.relation_id for r in records} <= set(RELATIONS)
    for r in records:
        picks = augmentation_phrasings(r, k=3, seed=0)
        filled = [p.format(r.subject) for p in picks]
        assert r.prompt not in picks
        assert not set(filled) & set(r.paraphrases)
        assert not any(f in p or p.endswith(f) for f in filled for p in r.paraphrases), r.case_id
