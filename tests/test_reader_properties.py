"""Property tests of every reader (knowledge: CounterFact, EasyEdit, zsRE, our records, as a JSON array or JSONL;
tasks: instruct, math, classify, text from JSON, JSONL, TSV, plain text): any input gives records or a
:class:`RecordError`, never another exception, and under ``on_error='skip'`` nothing goes missing without a word
(records returned + skipped (+ blank text records left out) == records in the file)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_readers import EASYEDIT, OWN, ROME, ZSRE_REC

from retention.data.readers import read_records
from retention.data.tasks import TaskConfig, read_examples
from retention.records import RecordError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Structured inputs (fuzzed records of the right shape)."""
RAW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Arbitrary bytes and text."""

KNOWLEDGE = {"counterfact": ROME, "easyedit": EASYEDIT, "zsre": ZSRE_REC, "records": OWN}
TASK_RECORDS = {
    "instruct": {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
    "math": {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
    "classify": {"text": "a gorgeous , witty movie .", "label": 1},
    "text": {"text": "A passage of plain text."},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
texts = st.sampled_from(["France", "Paris", "Rome", "The capital of {} is", "{}", "{:{}}", " ", "", "pos", "1.0", "0",
                         "#### 7", "x \u2028 y"]) | st.text(max_size=16)
raw_inputs = st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | json_values.map(
    lambda v: json.dumps(v).encode())
EDGES = [b"\xef\xbb\xbf", b"[" * 100_000, b"1" * 5_000, b'{"a": ' * 3_000 + b"1" + b"}" * 3_000, b"\t\n \r\n\x00"]
"""Inputs a generator rarely builds: a lone BOM, too deep nesting, an integer longer than Python parses, NUL."""


def with_edges(test):
    for data in EDGES:
        test = example(data=data)(test)
    return test


def _paths(value, prefix=()):
    """Key paths of every nested value (not the root)."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated(draw, base: dict):
    """``base`` with up to three nested values deleted or replaced by a text or any JSON value; or any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    record = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(record))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "text", "value"]))
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(texts if action == "text" else json_values)
    return record


@st.composite
def record_files(draw, base: dict, unique_ids: bool = False) -> tuple[str, str]:
    """(file text, suffix) of 1-6 fuzzed records as a JSON array or JSONL (maybe with invalid and blank lines)."""
    records = draw(st.lists(mutated(base), min_size=1, max_size=6))
    if unique_ids:  # distinct case ids, so that unmutated records are good ones
        records = [{**r, "case_id": i} if isinstance(r, dict) and "case_id" in r else r for i, r in enumerate(records)]
    if draw(st.booleans()):
        return json.dumps(records, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))), ".json"
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
    for _ in range(draw(st.integers(0, 2))):
        junk = draw(st.sampled_from(["", "  ", "{not json", "[1,", "nul", "{}"]) | st.text(max_size=10))
        lines.insert(draw(st.integers(0, len(lines))), junk.replace("\r", " ").replace("\n", " "))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines), ".jsonl"


def _json_records(text: str) -> int:
    """How many records a knowledge file holds: the items of a JSON array, one JSON object, else one per
    non-blank line (JSONL)."""
    try:
        top = json.loads(text)
    except ValueError:
        return sum(bool(line.strip()) for line in text.replace("\r\n", "\n").split("\n"))
    return len(top) if isinstance(top, list) else 1


def _file_level(err: RecordError) -> bool:
    """An error of the whole file (not UTF-8, no records, undetectable format, invalid JSON array, TSV header),
    which ``on_error='skip'`` cannot skip past."""
    return err.field_name in ("<file>", "<format>", "<json>") or "(header)" in str(err.record)


def _reader(kind: str, path: Path):
    """``read(on_error) -> (records, report)`` of the knowledge reader or of a task family's reader."""
    if kind == "knowledge":
        return lambda on_error: read_records(path, on_error=on_error)
    return lambda on_error: read_examples(TaskConfig(family=kind, source=str(path), on_error=on_error))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _write(folder: Path, data: str | bytes, suffix: str) -> Path:
    path = folder / f"data{suffix}"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _check_raise(read, expected: int) -> None:
    """Under ``on_error='raise'``: all ``expected`` records (less the blank ones left out) or a RecordError."""
    try:
        records, report = read("raise")
    except RecordError:
        return
    assert len(records) + report.dropped == expected and report.skipped == 0


def _check_skip(read, expected: int, path: Path) -> None:
    """Under ``on_error='skip'``: a file-level RecordError, or records + skipped (+ dropped) == ``expected``."""
    try:
        records, report = read("skip")
    except RecordError as err:
        assert _file_level(err), err
        return
    assert len(records) + report.skipped + report.dropped == expected
    assert report.skipped == len(report.errors) and all(e.path == str(path) for e in report.errors)


# -- knowledge readers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(KNOWLEDGE))
def test_knowledge_fuzzed_records(folder, fmt):
    @FUZZ
    @given(file=record_files(KNOWLEDGE[fmt], unique_ids=True))
    def check(file):
        text, suffix = file
        path = _write(folder, text, suffix)
        expected = _json_records(text)
        _check_raise(_reader("knowledge", path), expected)
        _check_skip(_reader("knowledge", path), expected, path)

    check()


# -- task readers -------------------------------------------------------------------------------------------


def _task_records(text: str, suffix: str) -> int | None:
    """How many records a task JSON(L) file holds (None: the file itself is malformed)."""
    if suffix == ".jsonl":
        return sum(bool(line.strip()) for line in text.replace("\r\n", "\n").split("\n"))
    top = json.loads(text)
    lists = [v for v in top.values() if isinstance(v, list)] if isinstance(top, dict) else [top]
    return len(lists[0]) if len(lists) == 1 and isinstance(lists[0], list) else None


@pytest.mark.parametrize("family", list(TASK_RECORDS))
def test_task_fuzzed_json_records(folder, family):
    @FUZZ
    @given(file=record_files(TASK_RECORDS[family]), wrap=st.booleans())
    def check(file, wrap):
        text, suffix = file
        if wrap and suffix == ".json":  # an object holding the list, as some task files have it
            text = f'{{"meta": 1, "data": {text}}}'
        path = _write(folder, text, suffix)
        read = _reader(family, path)
        expected = _task_records(text, suffix)
        _check_raise(read, -1 if expected is None else expected)
        _check_skip(read, -1 if expected is None else expected, path)

    check()


tsv_cells = st.text(st.characters(blacklist_characters="\t\r\n", blacklist_categories=("Cs",)), max_size=12)
tsv_labels = st.sampled_from(["0", "1", "-1", "2", "pos", "neg", "1.0", "", " "]) | tsv_cells


@st.composite
def tsv_files(draw) -> tuple[str, int]:
    """(file text, data rows): an optional header, then rows of mostly text and label (sometimes 1 or 3 cells)."""
    header = draw(st.sampled_from([None, ["sentence", "label"], ["label", "sentence"], ["id", "text", "label"]]))
    width = len(header) if header else 2
    label_at = header.index("label") if header else draw(st.integers(0, 1))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        row = [draw(tsv_cells) for _ in range(width)]
        row[label_at] = draw(tsv_labels)
        if draw(st.integers(0, 4)) == 0:
            row = row[:1] if draw(st.booleans()) else [*row, draw(tsv_cells)]
        rows.append("\t".join(row))
    rows = [r for r in rows if r.strip() or "\t" in r]  # a whitespace-only line is a blank line, not a record
    lines = (["\t".join(header)] if header else []) + rows
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + "\n", len(rows)


@FUZZ
@given(file=tsv_files())
def test_classify_fuzzed_tsv_rows(folder, file):
    text, expected = file
    path = _write(folder, text, ".tsv")
    read = _reader("classify", path)
    _check_raise(read, expected)
    _check_skip(read, expected, path)


# -- any input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,suffix", [("knowledge", ".json"), ("knowledge", ".jsonl"), ("instruct", ".json"),
                                         ("math", ".jsonl"), ("classify", ".tsv"), ("classify", ".jsonl"),
                                         ("text", ".json"), ("text", ".txt")])
def test_arbitrary_input(folder, kind, suffix):
    @RAW
    @with_edges
    @given(data=raw_inputs)
    def check(data):
        path = _write(folder, data, suffix)
        for on_error in ("raise", "skip"):
            try:
                examples, _ = _reader(kind, path)(on_error)
            except RecordError as err:
                assert on_error == "raise" or _file_level(err), err
                continue
            if kind == "text" and suffix == ".txt":  # every non-space character ends up in a passage
                assert "".join(data.decode("utf-8-sig").split()) == "".join("".join(e.text.split()) for e in examples)

    check()
