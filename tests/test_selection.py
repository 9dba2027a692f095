"""Fact selection (known facts under a protocol) and the seeded edit/control split."""

from __future__ import annotations

import pytest
from conftest import DATA, needs_data

from retention.data import selection
from retention.data.readers import load_records
from retention.data.selection import select_known, select_known_facts, split_edit_control
from retention.records import KnowledgeRecord
from retention.scoring import ProbeResult, score_probes

CF_ROME = DATA / "counterfact" / "counterfact_preknown.json"


def fact(i: int, subject: str | None = None, true: str | None = None, new: str | None = None) -> KnowledgeRecord:
    return KnowledgeRecord(
        case_id=str(i), subject=subject or f"S{i}", prompt="The capital of {} is", relation_id="P36",
        target_new=new or f"New{i}", target_true=true or f"True{i}",
        paraphrases=[f"Text. {subject or f'S{i}'}'s capital city is"],
    )


def test_select_scores_only_the_rewrite_probe_of_the_true_fact(monkeypatch):
    records = [fact(i) for i in range(5)]
    seen = {}

    def fake_score(model, tokenizer, probes, protocols, batch_size, progress):
        seen.update(probes=probes, protocols=protocols, batch_size=batch_size)
        return [ProbeResult(p, passed={"gen": p.case_id in ("1", "3")}) for p in probes]

    monkeypatch.setattr(selection, "score_probes", fake_score)
    known = select_known_facts(None, None, records, protocol="gen", batch_size=7)
    assert [r.case_id for r in known] == ["1", "3"]
    assert seen["protocols"] == ("gen",) and seen["batch_size"] == 7
    assert [(p.prompt, p.target, p.alternative) for p in seen["probes"]] == [
        (f"The capital of S{i} is", f"True{i}", f"New{i}") for i in range(5)
    ]
    with pytest.raises(ValueError, match="unknown protocol"):
        select_known_facts(None, None, records, protocol="exact")


def test_select_agrees_with_the_scorer_on_a_tiny_model(tiny_llama):
    model, tok = tiny_llama
    records = [fact(i, subject=s, true=t, new=n) for i, (s, t, n) in enumerate(
        [("France", "Paris", "Rome"), ("Italy", "Rome", "Paris"), ("Japan", "Tokyo", "Oslo"),
         ("Norway", "Oslo", "Tokyo"), ("Spain", "Madrid", "Lisbon"), ("Portugal", "Lisbon", "Madrid")])]
    results = score_probes(model, tok, [r.true_probes()[0] for r in records], protocols=("prob",))
    expected = [r.case_id for r, res in zip(records, results) if res.passed["prob"]]
    assert [r.case_id for r in select_known_facts(model, tok, records, protocol="prob", batch_size=4)] == expected


@pytest.mark.slow
def test_select_on_the_default_model(real_model):
    model, tok = real_model
    paris = fact(0, subject="France", true="Paris", new="Rome")
    wrong = fact(1, subject="France", true="Berlin", new="Paris")
    assert select_known_facts(model, tok, [paris, wrong], protocol="top1") == [paris]


@needs_data
@pytest.mark.slow
def test_select_counterfact_sample_on_the_default_model(real_model):
    model, tok = real_model
    records = load_records(CF_ROME, limit=16)
    top1 = select_known_facts(model, tok, records, protocol="top1")
    prob = select_known_facts(model, tok, records, protocol="prob")
    # on the full file 351 (top1) and 966 (prob) of 1,093 are known: top1 is far stricter
    assert 0 < len(top1) < len(prob) <= len(records)


def _subjects(rs):
    return {r.subject.casefold() for r in rs}


def _objects(rs):
    return {o.casefold() for r in rs for o in (r.target_true, r.target_new)}


def assert_disjoint(edit, control):
    assert not _subjects(edit) & _subjects(control)
    assert not _subjects(edit) & _objects(control) and not _subjects(control) & _objects(edit)


def test_split_sizes_disjointness_and_seeding():
    # subjects repeat (S0..S19 twice) and some objects are other records' subjects
    records = [fact(i, subject=f"S{i % 20}", true=f"S{(i + 7) % 40}" if i % 5 == 0 else None) for i in range(40)]
    edit, control = split_edit_control(records, n_edit=8, n_control=6, seed=3)
    assert (len(edit), len(control)) == (8, 6)
    assert_disjoint(edit, control)
    assert (edit, control) == split_edit_control(records, 8, 6, seed=3)
    splits = {tuple(r.case_id for r in split_edit_control(records, 8, 6, seed=s)[0]) for s in range(5)}
    assert len(splits) > 1


def test_split_is_case_insensitive_on_subjects_and_objects():
    records = [fact(0, subject="Paris"), fact(1, subject="paris "), fact(2, subject="France", true="PARIS")]
    with pytest.raises(ValueError, match="only 1 edit and 0 control"):
        split_edit_control(records, n_edit=1, n_control=1, seed=0)


def test_split_not_enough_facts():
    records = [fact(i) for i in range(5)]
    with pytest.raises(ValueError, match=r"only 4 edit and 1 control .* from 5 records \(seed 0\); 4 edit and 2 control"):
        split_edit_control(records, n_edit=4, n_control=2, seed=0)
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        split_edit_control(records, -1, 2)
    assert split_edit_control(records, 0, 0) == ([], [])


@needs_data
def test_split_counterfact_real_file():
    records = load_records(CF_ROME)
    edit, control = split_edit_control(records, n_edit=100, n_control=400, seed=0)
    assert (len(edit), len(control)) == (100, 400)
    assert_disjoint(edit, control)


def test_select_known_stops_scoring_once_n_known_facts_are_found(monkeypatch):
    records = [fact(i) for i in range(100)]
    scored = []

    def fake_score(model, tokenizer, probes, protocols, batch_size, progress):
        scored.extend(p.case_id for p in probes)
        return [ProbeResult(p, passed={"top1": int(p.case_id) % 3 == 0}) for p in probes]

    monkeypatch.setattr(selection, "score_probes", fake_score)
    known = select_known(None, None, records, 5, "top1", batch_size=4)
    assert [r.case_id for r in known] == ["0", "3", "6", "9", "12"]
    assert len(scored) < 30 and scored == [str(i) for i in range(len(scored))]
    assert [r.case_id for r in select_known(None, None, records, protocol="top1")] == [str(i) for i in range(0, 100, 3)]
    assert [r.case_id for r in select_known(None, None, records, 2, "none")] == ["0", "1"]
    assert len(select_known(None, None, records[:6], 5, "top1")) == 2


def test_select_known_takes_its_arguments_in_the_order_of_the_api():
    """``select_known(model, tokenizer, records, n, protocol, batch_size)`` in both places: a positional call
    means the same thing whichever one it reaches."""
    from inspect import signature

    from retention import api

    ours = list(signature(select_known).parameters)
    assert ours[: len(signature(api.select_known).parameters)] == list(signature(api.select_known).parameters)
