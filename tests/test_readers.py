"""Readers: the real CounterFact / zsRE files, format detection from content, every malformed-record case."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import DATA, needs_data

from retention.data.readers import load_records, read_records
from retention.records import KnowledgeRecord, NeighborhoodPrompt, RecordError

CF_ROME = DATA / "counterfact" / "counterfact_preknown.json"
CF_EASYEDIT = DATA / "counterfact" / "counterfact-val.easyedit.json"
ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"

ROME = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The capital of {} is",
        "relation_id": "P36",
        "target_new": {"str": "Rome", "id": "Q220"},
        "target_true": {"str": "Paris", "id": "Q90"},
        "subject": "France",
    },
    "paraphrase_prompts": ["Some text. France's capital city is"],
    "neighborhood_prompts": ["The capital of Île-de-France is"],
    "attribute_prompts": ["The capital of Italy is"],
    "generation_prompts": ["France is a country whose capital"],
}
EASYEDIT = {
    "case_id": 3,
    "prompt": "The capital of France is",
    "subject": "France",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "rephrase_prompt": "France's capital city is",
    "locality_prompt": "The capital of Île-de-France is",
    "locality_ground_truth": "Paris",
}
ZSRE_REC = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who wrote the big lebowski",
    "loc_ans": "Coen brothers",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
OWN = KnowledgeRecord(
    case_id="c1", subject="France", prompt="The capital of {} is", relation_id="P36", target_new="Rome",
    target_true="Paris", paraphrases=["France's capital city is"],
    neighborhood=[NeighborhoodPrompt("The capital of Italy is", "Rome")], augmentations=["{} has its capital in"],
    source="builtin",
).to_dict()


def write(tmp_path, data, name="data.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def edited(record: dict, path: tuple, value) -> dict:
    """A copy of ``record`` with the nested key ``path`` set to ``value`` (or deleted when value is DELETE)."""
    rec = copy.deepcopy(record)
    node = rec
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return rec


DELETE = object()


@needs_data
def test_counterfact_rome_format_real_file():
    records, report = read_records(CF_ROME)
    assert (len(records), report.format, report.skipped) == (1093, "counterfact", 0)
    r = records[0]
    assert (r.case_id, r.subject, r.prompt, r.relation_id) == ("0", "Danielle Darrieux", "The mother tongue of {} is", "P103")
    assert (r.target_new, r.target_true) == ("English", "French")
    assert len(r.paraphrases) == 2 and len(r.neighborhood) == 10 and len(r.generation_prompts) == 10
    assert all(n.target == "French" for n in r.neighborhood)  # CounterFact neighbours keep the true object
    assert r.augmentations == [] and r.source == "counterfact"
    assert len({r.relation_id for r in records}) == 26


@needs_data
def test_counterfact_easyedit_format_real_file():
    records, report = read_records(CF_EASYEDIT)
    assert (len(records), report.format, report.skipped) == (1919, "easyedit", 0)
    r = records[0]
    assert (r.case_id, r.subject, r.prompt, r.relation_id) == ("10", "BBC One", "{}, by", "")
    assert (r.target_new, r.target_true, r.rewrite_prompt) == ("Sega", "BBC", "BBC One, by")
    assert r.paraphrases == ["BBC One is my favorite product out of everything owned by"]
    assert r.neighborhood == [NeighborhoodPrompt("BBC Radio, by", "BBC")]
    assert all(rec.rewrite_prompt.startswith(rec.prompt.split("{}")[0]) for rec in records)


@needs_data
def test_zsre_real_file_both_conventions():
    # 19 of the 1,000 records cannot be edits: 17 have alt == answers[0], 2 have an empty alt.
    with pytest.raises(RecordError, match=r"record 101: field 'target_new': equals target_true"):
        load_records(ZSRE)
    records, report = read_records(ZSRE, on_error="skip")
    assert (len(records), report.skipped, report.format) == (981, 19, "zsre")
    assert sum("'alt': empty" in str(e) for e in report.errors) == 2
    r = records[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "UniFirst", "What is the product made by {}?", "unmanned aircraft", "uniform")
    assert r.paraphrases == ["What will be the product of UniFirst?"]
    assert r.neighborhood == [NeighborhoodPrompt("nq question: john goodman's character in the big lebowski?", "Walter Sobchak")]
    rome = load_records(ZSRE, on_error="skip", zsre_target="answers0")
    assert [(x.target_new, x.target_true) for x in rome] == [(x.target_true, x.target_new) for x in records]
    assert all(x.target_new == x.target_new.strip() for x in records)  # 10 alts carry a leading space


@needs_data
def test_limit_keeps_first_records():
    assert [r.case_id for r in load_records(CF_ROME, limit=3)] == [r.case_id for r in load_records(CF_ROME)[:3]]
    assert load_records(CF_ROME, limit=0) == []


def test_detects_format_from_content_not_name(tmp_path):
    cases = {"counterfact": ROME, "easyedit": EASYEDIT, "zsre": ZSRE_REC, "records": OWN}
    for fmt, rec in cases.items():
        records, report = read_records(write(tmp_path, [rec], name="misleading.jsonl"))
        assert report.format == fmt
        assert records[0].rewrite_prompt in ("The capital of France is", "What is the product made by UniFirst?")


def test_own_format_round_trip_json_and_jsonl(tmp_path):
    a = KnowledgeRecord.from_dict(OWN)
    b = KnowledgeRecord.from_dict({**OWN, "case_id": "c2", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"})
    as_json = write(tmp_path, [a.to_dict(), b.to_dict()])
    as_jsonl = write(tmp_path, "\n".join(json.dumps(r.to_dict()) for r in (a, b)) + "\n\n", name="r.jsonl")
    assert load_records(as_json) == load_records(as_jsonl) == [a, b]


def test_easyedit_template_escapes_braces_and_takes_first_subject(tmp_path):
    rec = {**EASYEDIT, "prompt": "In {set notation} France, the capital of France is"}
    (r,) = load_records(write(tmp_path, [rec]))
    assert r.prompt == "In {{set notation}} {}, the capital of France is"
    assert r.rewrite_prompt == rec["prompt"]


def test_easyedit_list_fields(tmp_path):
    rec = {**EASYEDIT, "rephrase_prompt": ["a France b", "c France d"], "locality_prompt": ["x", "y"],
           "locality_ground_truth": ["X", "Y"]}
    (r,) = load_records(write(tmp_path, [rec]))
    assert r.paraphrases == ["a France b", "c France d"]
    assert r.neighborhood == [NeighborhoodPrompt("x", "X"), NeighborhoodPrompt("y", "Y")]


def test_rome_neighbourhood_dicts_and_missing_optional_lists(tmp_path):
    rec = edited(ROME, ("neighborhood_prompts",), [{"prompt": "The capital of Italy is", "target": "Rome"}])
    rec = edited(rec, ("generation_prompts",), DELETE)
    (r,) = load_records(write(tmp_path, [rec]))
    assert r.neighborhood == [NeighborhoodPrompt("The capital of Italy is", "Rome")] and r.generation_prompts == []


def test_builtin_name_resolves_to_packaged_set():
    records, report = read_records("builtin")
    assert report.format == "records" and report.path == "<builtin>" and len(records) >= 300


def test_file_named_like_builtin_set_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, [ROME], name="builtin")
    assert read_records("builtin")[1].format == "counterfact"


# (record, path to change, new value, expected field, expected message fragment)
MALFORMED = [
    (ROME, ("requested_rewrite",), DELETE, "requested_rewrite", "missing"),
    (ROME, ("requested_rewrite", "subject"), DELETE, "requested_rewrite.subject", "missing"),
    (ROME, ("requested_rewrite", "subject"), 42, "requested_rewrite.subject", "expected str, got int"),
    (ROME, ("requested_rewrite", "subject"), "  ", "requested_rewrite.subject", "empty"),
    (ROME, ("requested_rewrite", "subject"), " France", "subject", "surrounding whitespace"),
    (ROME, ("requested_rewrite", "prompt"), "The capital of France is", "prompt", "exactly one '{}'"),
    (ROME, ("requested_rewrite", "prompt"), "{} and {} is", "prompt", "exactly one '{}'"),
    (ROME, ("requested_rewrite", "prompt"), "The {0} of {} is", "prompt", "exactly one '{}'"),
    (ROME, ("requested_rewrite", "prompt"), "The capital of {:>{}} is", "prompt", "exactly one '{}'"),
    (ROME, ("requested_rewrite", "prompt"), "The capital of {!r} is", "prompt", "exactly one '{}'"),
    (ROME, ("requested_rewrite", "prompt"), "The capital of {} is {", "prompt", "unbalanced braces"),
    (ROME, ("requested_rewrite", "prompt"), "The capital of {} is ", "prompt", "ends with whitespace"),
    (ROME, ("requested_rewrite", "relation_id"), 36, "requested_rewrite.relation_id", "expected str"),
    (ROME, ("requested_rewrite", "target_new"), "Rome", "requested_rewrite.target_new", "expected dict, got str"),
    (ROME, ("requested_rewrite", "target_new", "str"), DELETE, "requested_rewrite.target_new.str", "missing"),
    (ROME, ("requested_rewrite", "target_new", "str"), "", "requested_rewrite.target_new.str", "empty"),
    (ROME, ("requested_rewrite", "target_true", "str"), None, "requested_rewrite.target_true.str", "got NoneType"),
    (ROME, ("requested_rewrite", "target_new", "str"), "paris", "target_new", "equals target_true"),
    (ROME, ("paraphrase_prompts",), "France's capital is", "paraphrase_prompts", "expected list, got str"),
    (ROME, ("paraphrase_prompts",), ["ok", 3], "paraphrase_prompts[1]", "expected str, got int"),
    (ROME, ("paraphrase_prompts",), ["ok", ""], "paraphrase_prompts[1]", "empty"),
    (ROME, ("paraphrase_prompts",), ["France's capital is "], "paraphrases[0]", "ends with whitespace"),
    (ROME, ("neighborhood_prompts",), [7], "neighborhood_prompts[0]", "expected a non-empty str"),
    (ROME, ("neighborhood_prompts",), [{"prompt": "x"}], "neighborhood_prompts[0].target", "missing"),
    (ROME, ("case_id",), [1], "case_id", "expected a non-empty int or str"),
    (ROME, ("case_id",), True, "case_id", "expected a non-empty int or str"),
    (EASYEDIT, ("prompt",), DELETE, "prompt", "missing"),
    (EASYEDIT, ("ground_truth",), [1], "ground_truth", "expected answers"),
    (EASYEDIT, ("ground_truth",), [], "ground_truth", "empty list"),
    (EASYEDIT, ("target_new",), " ", "target_new", "empty"),
    (EASYEDIT, ("subject",), "Germany", "subject", "'Germany' does not occur in prompt"),
    (EASYEDIT, ("prompt",), "The capital of France is  ", "prompt", "ends with whitespace"),
    (EASYEDIT, ("locality_ground_truth",), DELETE, "locality_ground_truth", "0 answer(s) for 1 locality_prompt"),
    (EASYEDIT, ("rephrase_prompt",), {"a": 1}, "rephrase_prompt", "expected list or str, got dict"),
    (ZSRE_REC, ("src",), DELETE, "src", "missing"),
    (ZSRE_REC, ("subject",), "Acme", "subject", "does not occur in src"),
    (ZSRE_REC, ("answers",), [], "answers", "empty list"),
    (ZSRE_REC, ("answers",), "uniform", "answers", "expected list, got str"),
    (ZSRE_REC, ("alt",), "", "alt", "empty"),
    (ZSRE_REC, ("alt",), "Uniform", "target_new", "equals target_true"),
    (ZSRE_REC, ("loc_ans",), DELETE, "loc_ans", "missing"),
    (OWN, ("prompt",), "The capital of France is", "prompt", "exactly one '{}'"),
    (OWN, ("target_true",), DELETE, "target_true", "missing"),
    (OWN, ("colour",), "blue", "colour", "unknown field"),
    (OWN, ("neighborhood",), [["The capital of Italy is", "Rome"]], "neighborhood[0]", "expected {prompt, target}"),
    (OWN, ("neighborhood",), [{"prompt": "p", "target": "t", "x": 1}], "neighborhood[0].x", "unknown field"),
    (OWN, ("augmentations",), ["The capital of France is"], "augmentations[0]", "exactly one '{}'"),
    (OWN, ("augmentations",), ["{}'s capital city is"], "augmentations[0]", "evaluation paraphrase"),
    (OWN, ("augmentations",), ["The capital of {} is"], "augmentations[0]", "repeats the prompt"),
]


@pytest.mark.parametrize("record,path,value,field,message", MALFORMED)
def test_malformed_record_names_file_record_and_field(tmp_path, record, path, value, field, message):
    good = copy.deepcopy(record)
    if "case_id" in good:
        good["case_id"] = "good"
    bad = edited(record, path, value)
    file = write(tmp_path, [good, bad])
    with pytest.raises(RecordError) as info:
        load_records(file)
    err = info.value
    assert (err.path, err.field_name) == (file, field)
    assert str(err.record).startswith("1")  # the index, with the case id when the record has one
    assert message in str(err) and file in str(err)
    records, report = read_records(file, on_error="skip")
    assert len(records) == 1 and report.skipped == 1 and report.errors[0].field_name == field


def test_duplicate_case_id(tmp_path):
    file = write(tmp_path, [ROME, ROME])
    with pytest.raises(RecordError, match=r"record 1 \(case_id 7\): field 'case_id': duplicate case_id 7"):
        load_records(file)


def test_record_that_is_not_an_object(tmp_path):
    file = write(tmp_path, [ROME, ["not", "a", "record"]])
    with pytest.raises(RecordError, match=r"record 1: field '<record>': expected a JSON object, got list"):
        load_records(file)
    assert read_records(file, on_error="skip")[1].skipped == 1


def test_invalid_json_array_names_the_line(tmp_path):
    text = json.dumps([ROME, EASYEDIT], indent=1).replace('"subject": "France"', '"subject": France', 1)
    bad_line = next(i for i, line in enumerate(text.splitlines(), 1) if '"subject": France' in line)
    file = write(tmp_path, text)
    with pytest.raises(RecordError, match=rf"record line {bad_line}: field '<json>': invalid JSON"):
        load_records(file)
    with pytest.raises(RecordError, match="invalid JSON"):  # a broken array cannot be skipped past
        load_records(file, on_error="skip")


def test_invalid_json_object_spanning_lines(tmp_path):
    file = write(tmp_path, json.dumps(ROME, indent=1).replace('"case_id": 7,', '"case_id": 7', 1))
    with pytest.raises(RecordError, match=r"record line 3: field '<json>': invalid JSON"):
        load_records(file)


def test_invalid_jsonl_line(tmp_path):
    lines = [json.dumps(ROME), "{not json", json.dumps({**ROME, "case_id": 8})]
    file = write(tmp_path, "\n".join(lines), name="r.jsonl")
    with pytest.raises(RecordError, match=r"record line 2: field '<json>': invalid JSON"):
        load_records(file)
    records, report = read_records(file, on_error="skip")
    assert [r.case_id for r in records] == ["7", "8"] and report.skipped == 1


@pytest.mark.parametrize(
    "text,message",
    [("", "empty file"), ("  \n", "empty file"), ("[]", "no records"), ("3", "expected a JSON array"),
     ("[1, 2]", "no record has a key that tells the format"), ('[{"foo": 1}]', "no record has a key")],
)
def test_file_level_errors(tmp_path, text, message):
    file = write(tmp_path, text)
    with pytest.raises(RecordError, match=message):
        load_records(file, on_error="skip")


def test_not_utf8_names_line_and_byte(tmp_path):
    text = json.dumps([EASYEDIT], ensure_ascii=False, indent=1)
    path = tmp_path / "latin1.json"
    path.write_bytes(text.encode("latin-1"))
    at = text.index("\u00ce")  # "Île-de-France": the first non-ASCII character, one byte in Latin-1
    line = text[:at].count("\n") + 1
    with pytest.raises(RecordError, match=rf"latin1\.json: record line {line}: field '<file>': not UTF-8 text: "
                                          rf"byte {at} \(0xce\)"):
        load_records(path)


def test_bom_accepted_in_json_and_jsonl(tmp_path):
    for name, text in (("r.json", json.dumps([ROME])), ("r.jsonl", json.dumps(ROME) + "\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r.case_id for r in load_records(path)] == ["7"]


def test_jsonl_bad_first_line_is_one_skipped_record(tmp_path):
    lines = ["{not json", json.dumps(ROME), json.dumps({**ROME, "case_id": 8})]
    file = write(tmp_path, "\n".join(lines), name="r.jsonl")
    with pytest.raises(RecordError, match=r"record line 1: field '<json>': invalid JSON"):
        load_records(file)
    records, report = read_records(file, on_error="skip")
    assert [r.case_id for r in records] == ["7", "8"] and report.skipped == 1 and report.format == "counterfact"


def test_malformed_first_record_does_not_decide_the_format(tmp_path):
    broken = {"case_id": 1, "ground_truth": "Paris"}  # an EasyEdit key, in a CounterFact file
    file = write(tmp_path, [broken, ROME, {**ROME, "case_id": 8}])
    records, report = read_records(file, on_error="skip")
    assert (report.format, [r.case_id for r in records], report.skipped) == ("counterfact", ["7", "8"], 1)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    rec = {**EASYEDIT, "rephrase_prompt": "France\u2028capital\x85city is"}  # json.dumps leaves both unescaped
    lines = [json.dumps(rec, ensure_ascii=False), json.dumps({**rec, "case_id": 4}, ensure_ascii=False)]
    file = write(tmp_path, "\n".join(lines), name="r.jsonl")
    assert [r.paraphrases for r in load_records(file)] == [[rec["rephrase_prompt"]]] * 2


def test_too_long_text_is_malformed(tmp_path):
    long = edited(ROME, ("paraphrase_prompts",), ["France " * 80_000 + "has its capital in"])  # 560 KB
    file = write(tmp_path, [long, {**ROME, "case_id": 8}])
    with pytest.raises(RecordError, match=r"record 0 \(case_id 7\): field 'paraphrases\[0\]': 560,018 characters, "
                                          r"more than max_prompt_chars=20,000"):
        load_records(file)
    records, report = read_records(file, on_error="skip")
    assert [r.case_id for r in records] == ["8"] and report.skipped == 1
    assert len(load_records(file, max_prompt_chars=600_000)) == 2
    with pytest.raises(ValueError, match="max_prompt_chars=0"):
        load_records(file, max_prompt_chars=0)


def test_missing_file_folder_and_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file, and not a built-in knowledge set"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_records(tmp_path)
    file = write(tmp_path, [ROME])
    with pytest.raises(ValueError, match="on_error='ignore'"):
        load_records(file, on_error="ignore")
    with pytest.raises(ValueError, match="zsre_target='pred'"):
        load_records(file, zsre_target="pred")
    with pytest.raises(ValueError, match="limit=-1"):
        load_records(file, limit=-1)


def test_the_read_summary_names_the_format_once(tmp_path):
    """It used to say "read 2 records records" for our own format."""
    path = tmp_path / "own.json"
    path.write_text(json.dumps([OWN, {**OWN, "case_id": "2"}]))
    _, report = read_records(path)
    assert report.summary().startswith(f"read 2 records (records format) from {path}")


def _fake_datasets(monkeypatch, rows):
    """A stand-in ``datasets`` module whose ``load_dataset`` returns ``rows`` (the real one needs the network)."""
    import importlib.machinery
    import sys
    import types

    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split))
        return list(rows)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_an_hf_knowledge_source_is_read_through_datasets(monkeypatch):
    calls = _fake_datasets(monkeypatch, [ROME, {**ROME, "case_id": 2}])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the local cache serves it: no hub check
    records, report = read_records("hf:someone/counterfact:v2")
    assert calls == [("someone/counterfact", "v2", "train")]
    assert [r.case_id for r in records] == ["7", "2"] and report.format == "counterfact"
    assert report.path == "hf:someone/counterfact:v2"


def test_an_hf_knowledge_source_with_the_hub_unreachable_fails_at_once_naming_it(monkeypatch):
    import time

    _fake_datasets(monkeypatch, [ROME])
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"^hf:someone/counterfact: the hub http://127\.0\.0\.1:9 could not be "
                                                r"reached .*connect to the network"):
        read_records("hf:someone/counterfact")
    assert time.perf_counter() - t0 < 10


def test_an_hf_knowledge_source_without_datasets_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"knowledge source hf:x/y needs the 'datasets' package: pip install "
                                          r"'retention\[hf\]'"):
        read_records("hf:x/y")
