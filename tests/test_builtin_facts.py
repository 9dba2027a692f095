import json
from collections import Counter
from importlib import resources

import pytest

from retention.data import builtin_facts
from retention.data.builtin_facts import (
    N_AUGMENTATIONS,
    N_NEIGHBOURS,
    N_PARAPHRASES,
    RELATIONS,
    build_builtin_facts,
    main,
)
from retention.data.readers import load_records
from retention.data.relations import RELATIONS as RELATION_TABLE
from retention.data.relations import load_resource, resembles
from retention.io import atomic_write_json
from retention.records import KnowledgeRecord, Probe

BY_ID = {rel.relation_id: rel for rel in RELATIONS}


@pytest.fixture(scope="module")
def shipped() -> list[KnowledgeRecord]:
    return load_records("builtin")


def test_shipped_set_has_300_facts_over_8_relations(shipped):
    assert len(shipped) >= 300
    assert len({r.case_id for r in shipped}) == len(shipped)
    assert {r.source for r in shipped} == {"builtin"}
    per_relation = Counter(r.relation_id for r in shipped)
    assert set(per_relation) <= set(BY_ID)
    assert sum(n >= 15 for n in per_relation.values()) >= 8, per_relation


def test_relations_have_a_main_template_and_five_distinct_phrasings():
    assert len(BY_ID) == len(RELATIONS)
    for rel in RELATIONS:
        assert len(rel.templates) >= 6, rel.relation_id
        for t in (*rel.templates, *rel.generation_templates):
            assert t.count("{}") == 1 and t == t.strip() and not t.endswith("{}"), (rel.relation_id, t)
        # Phrasings are pairwise unlike each other, so any split keeps evaluation apart from augmentation.
        phrasings = rel.templates[1:]
        for a in phrasings:
            for b in phrasings:
                assert a == b or not resembles(a, "Xyz", b.format("Xyz")), (rel.relation_id, a, b)
        subjects = [s for s, _ in rel.facts]
        assert len(subjects) == len(set(subjects)), rel.relation_id
        assert len(rel.objects) >= 4, rel.relation_id


def test_tables_are_package_data_and_use_the_one_relation_table():
    rows = load_resource(builtin_facts.BUILTIN_RELATIONS_RESOURCE)
    assert [row["relation"] for row in rows] == [rel.relation_id for rel in RELATIONS]
    for row, rel in zip(rows, RELATIONS):
        table = RELATION_TABLE[rel.relation_id]
        # the built-in templates: the first 1 + phrasings of the relation's one table, no second table
        assert rel.templates == table.templates[: 1 + row["phrasings"]] and rel.name == table.name
        assert all(isinstance(x, str) for pair in rel.facts for x in pair), rel.relation_id  # no YAML bools
    assert sum(len(rel.facts) for rel in RELATIONS) == 895


def test_phrasings_beyond_the_relation_table_are_refused(monkeypatch):
    rows = load_resource(builtin_facts.BUILTIN_RELATIONS_RESOURCE)
    rows[0]["phrasings"] = len(RELATION_TABLE[rows[0]["relation"]].templates)
    monkeypatch.setattr(builtin_facts, "load_resource", lambda name: rows)
    with pytest.raises(ValueError, match=rf"{rows[0]['relation']}: phrasings \d+, but the relation has \d+ "):
        builtin_facts._load_relations()


def test_records_come_from_the_tables(shipped):
    for r in shipped:
        rel = BY_ID[r.relation_id]
        assert r.prompt == rel.templates[0]
        assert (r.subject, r.target_true) in rel.facts
        assert r.case_id == rel.case_id(rel.facts.index((r.subject, r.target_true)))


def test_paraphrases_are_held_out_from_augmentations(shipped):
    for r in shipped:
        phrasings = BY_ID[r.relation_id].templates[1:]
        assert len(r.paraphrases) == N_PARAPHRASES and len(r.augmentations) == N_AUGMENTATIONS
        assert set(r.augmentations) <= set(phrasings)
        evaluation = [t for t in phrasings if t.format(r.subject) in r.paraphrases]
        assert len(evaluation) == N_PARAPHRASES
        assert not set(evaluation) & set(r.augmentations)
        for aug in r.augmentations:
            assert not any(resembles(aug, r.subject, p) for p in r.paraphrases), (r.case_id, aug)


def test_counterfactual_targets_are_other_objects_of_the_relation(shipped):
    for r in shipped:
        assert r.target_new != r.target_true
        assert r.target_new in BY_ID[r.relation_id].objects
        assert r.target_new.split()[0].lower() != r.target_true.split()[0].lower()


def test_neighbours_are_other_known_subjects_with_their_own_objects(shipped):
    known = {(r.relation_id, r.rewrite_prompt): r for r in shipped}
    full = 0
    for r in shipped:
        assert 1 <= len(r.neighborhood) <= N_NEIGHBOURS
        full += len(r.neighborhood) == N_NEIGHBOURS
        for n in r.neighborhood:
            other = known[(r.relation_id, n.prompt)]
            assert other.subject != r.subject and other.target_true == n.target != r.target_new
        assert len(r.generation_prompts) == 2 and all(r.subject in g for g in r.generation_prompts)
    assert full >= 0.95 * len(shipped)


def test_build_is_seeded_and_filtering_moves_no_other_record():
    full = build_builtin_facts(seed=0)
    assert full == build_builtin_facts(seed=0)
    assert [r.target_new for r in build_builtin_facts(seed=1)] != [r.target_new for r in full]
    keep = {r.case_id for r in full[::2]}
    kept = build_builtin_facts(seed=0, keep=keep)
    assert [r.case_id for r in kept] == [r.case_id for r in full if r.case_id in keep]
    by_id = {r.case_id: r for r in full}
    for r in kept:
        same = by_id[r.case_id]
        assert (r.target_new, r.paraphrases, r.augmentations) == (same.target_new, same.paraphrases, same.augmentations)
        assert {n.prompt for n in r.neighborhood} <= {rel.templates[0].format(s) for rel in RELATIONS for s, _ in rel.facts}


def test_shipped_file_is_what_the_tables_build(shipped, tmp_path):
    """Editing a table without regenerating the file fails here (regenerate with the module's command)."""
    from retention.models import default_tokenizer
    from retention.scoring import target_ids

    tokenizer = default_tokenizer()
    rebuilt = build_builtin_facts(0, {r.case_id for r in shipped}, lambda t: target_ids(tokenizer, t)[0])
    assert rebuilt == shipped
    # byte for byte, as the module's command writes it
    out = atomic_write_json(tmp_path / "builtin_facts.json", [r.to_dict() for r in rebuilt])
    assert out.read_bytes() == (resources.files("retention") / "resources" / "builtin_facts.json").read_bytes()
    for r in shipped:
        assert target_ids(tokenizer, r.target_new)[0] != target_ids(tokenizer, r.target_true)[0], r.case_id


def test_command_writes_unfiltered_candidates(tmp_path, capsys):
    out = tmp_path / "facts.json"
    assert main(["--out", str(out), "--no-filter", "--seed", "3"]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert len(rows) == sum(len(rel.facts) for rel in RELATIONS)
    assert [KnowledgeRecord.from_dict(d) for d in rows] == build_builtin_facts(seed=3)
    assert "total" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_knows_the_shipped_facts_under_top1(real_model, shipped):
    from retention.scoring import score_probes

    model, tokenizer = real_model
    probes = [Probe(r.rewrite_prompt, r.target_true, r.target_new, "control", r.case_id) for r in shipped]
    results = score_probes(model, tokenizer, probes, protocols=("top1",), batch_size=64)
    passed = sum(res.passed["top1"] for res in results)
    assert passed >= 0.95 * len(shipped), f"{passed}/{len(shipped)} shipped facts pass top1"
