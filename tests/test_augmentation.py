"""Paraphrase augmentation: K editing phrasings per edit from each source, never an evaluation paraphrase."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import DATA, needs_data

from retention.callbacks.augmentation import ParaphraseAugmentation, phrasings, sampler
from retention.data.phrasings import allowed
from retention.data.readers import load_records
from retention.data.relations import resembles
from retention.records import KnowledgeRecord


def _never_evaluation(record: KnowledgeRecord, templates: list[str]) -> None:
    for t in templates:
        assert t.count("{}") == 1
        assert t.format(record.subject) != record.rewrite_prompt
        for p in record.paraphrases:
            assert t.format(record.subject) != p and not resembles(t, record.subject, p), (t, p)


@pytest.fixture(scope="module")
def builtin() -> list[KnowledgeRecord]:
    return load_records("builtin")


@pytest.mark.parametrize("source", ["record", "relations"])
def test_table_sources_give_k_phrasings_and_no_evaluation_paraphrase(builtin, source):
    records = [r for r in builtin if r.relation_id.startswith("P")][:40]
    for r in records:
        got = phrasings(r, 3, source, seed=0)
        assert len(got) == 3 and len(set(got)) == 3
        _never_evaluation(r, got)
        if source == "record":
            assert got == [t for t in r.augmentations if allowed(r, t)][:3]


def test_poisoned_record_augmentations_are_dropped(builtin):
    r = builtin[0]
    leaked = [p.replace(r.subject, "{}") for p in r.paraphrases]
    poisoned = dataclasses.replace(r, augmentations=[*leaked, r.prompt, *r.augmentations])
    got = phrasings(poisoned, 3, "record")
    assert not set(got) & {*leaked, r.prompt}
    _never_evaluation(r, got)


def test_model_source_keeps_only_new_phrasings_of_the_subject(builtin):
    r = builtin[0]
    marked = f"[{r.subject}]"
    outputs = [
        " " + r.paraphrases[0].replace(r.subject, marked) + "\nOriginal: ...",  # an evaluation paraphrase
        " " + r.rewrite_prompt.replace(r.subject, marked),  # the prompt itself
        " The nation of " + marked + " is governed from the city of",
        " Nothing about the subject here",
        " " + marked + " and " + marked + " twice",
    ]
    got = phrasings(r, 3, "model", generate=lambda prompt, n: outputs)
    assert got == ["The nation of {} is governed from the city of"]
    _never_evaluation(r, got)


def test_model_source_samples_from_a_model(builtin, tiny_llama):
    model, tok = tiny_llama
    calls = []

    def generate(prompt: str, n: int) -> list[str]:
        calls.append(sampler(model, tok, seed=0, max_new_tokens=6)(prompt, n))
        return calls[-1]

    _never_evaluation(builtin[0], phrasings(builtin[0], 1, "model", generate=generate))
    assert len(calls[0]) == 4  # 4k candidates are sampled
    assert generate("Original: The capital of [France] is\nRewrite:", 2) == \
        generate("Original: The capital of [France] is\nRewrite:", 2)  # seeded


@needs_data
def test_counterfact_relations_never_resemble_evaluation_paraphrases():
    records = load_records(DATA / "counterfact" / "counterfact_preknown.json", limit=200)
    for r in records:
        _never_evaluation(r, phrasings(r, 3, "relations", seed=1))


def test_callback_sets_augmentations_before_editing(builtin):
    records = builtin[:5]
    aug = ParaphraseAugmentation(k=2, source="relations", seed=0)
    out = aug.on_before_edits(None, None, records)
    assert [len(r.augmentations) for r in out] == [2] * 5
    assert [r.paraphrases for r in out] == [r.paraphrases for r in records]  # evaluation probes untouched
    assert ParaphraseAugmentation(k=0).on_before_edits(None, None, records) is records
    with pytest.raises(ValueError, match="generator is used only with source 'model'"):
        ParaphraseAugmentation(k=1, source="record", generator="tiny-llama")
