"""Reading task records from local files (JSON, JSONL; Parquet, CSV, Arrow through ``datasets``) or the Hugging
Face hub, with errors that name the file, the record and the field. Files are decoded, split into lines and their
malformed records skipped or raised the way the knowledge readers do it (:mod:`retention.data.readers`).

Parquet, CSV and Arrow files and ``hf:<id>`` datasets need the ``datasets`` library (the optional extra
``retention[hf]``); without it they are refused with an ImportError that names the extra. Local files are read
in memory (nothing is written to the Hugging Face cache); a hub id needs a network."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from retention.corpus import HF_PREFIX, TABLE_SUFFIXES, read_hub_records, read_table_records
from retention.data.readers import ReadReport, check_length, json_error, load_json, parse_jsonl, read_text
from retention.records import RecordError

T = TypeVar("T")

"""How to install the ``datasets`` library, named in every error of a source that needs it."""
"""Local file types read through ``datasets`` -> its loader."""


def is_hub_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def local_file(source: str) -> Path:
    """The local file a task reads, with an error that says how to ask for a hub dataset instead."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"task data file {source} does not exist (use 'builtin' for the built-in default or "
            f"'{HF_PREFIX}<dataset id>' for a Hugging Face dataset)"
        )
    return path


def read_json_records(path: Path, report: ReadReport | None = None) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs of a JSON file (a list, or an object holding one list) or a JSONL file; an
    invalid JSONL line goes to ``report.reject`` (raised when there is no report)."""
    text, where = read_text(path), str(path)
    if path.suffix == ".jsonl":
        for _, lineno, record in parse_jsonl(where, text, report or ReadReport(where, hint="")):
            yield f"line {lineno}", record
        return
    try:
        data = load_json(text)
    except json.JSONDecodeError as err:
        raise json_error(where, err) from None
    if isinstance(data, Mapping):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RecordError(where, "-", "<file>", "expected a JSON list of records (or an object holding exactly "
                              f"one list), got an object with {len(lists)} lists")
        data = lists[0]
    if not isinstance(data, list):
        raise RecordError(where, "-", "<file>", f"expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield str(i), record


def read_records(
    source: str, hf_config: str | None = None, hf_split: str = "train", other_types: tuple[str, ...] = (),
    report: ReadReport | None = None,
) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs of ``hf:<id>``, of a local ``.json``/``.jsonl`` file or of a local
    ``.parquet``/``.csv``/``.arrow`` file (``other_types``: the file types the caller reads itself, named in the
    error for an unsupported one)."""
    if is_hub_source(source):
        return read_hub_records(source, hf_config, hf_split)
    path = local_file(source)
    if path.suffix in TABLE_SUFFIXES and path.suffix not in other_types:
        return read_table_records(path)
    if path.suffix not in (".json", ".jsonl"):
        expected = ", ".join((*other_types, ".json", ".jsonl", *TABLE_SUFFIXES))
        raise ValueError(f"task data file {path}: unsupported type '{path.suffix}' (expected {expected})")
    return read_json_records(path, report)


def convert_records(records: Iterable[tuple[str, Any]], convert: Callable[[str, Any], T], report: ReadReport) -> list[T]:
    """``convert(location, record)`` of each record, in order; a :class:`RecordError` goes to ``report.reject``
    (raised, or the record skipped and counted)."""
    out = []
    for location, record in records:
        try:
            out.append(convert(location, record))
        except RecordError as err:
            report.reject(err)
    return out


def field(record: Any, name: str, path: str, location: str, allow_empty: bool = False) -> Any:
    """``record[name]``, or an error naming the file, the record and the missing field."""
    if not isinstance(record, Mapping):
        raise RecordError(path, location, name, f"expected an object with field '{name}', got {type(record).__name__}")
    if name not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(path, location, name, f"missing (fields present: {have}); map it with fields={{...}}")
    value = record[name]
    if value is None or (not allow_empty and isinstance(value, str) and not value.strip()):
        raise RecordError(path, location, name, "empty")
    return value


def text_field(
    record: Any, name: str, path: str, location: str, allow_empty: bool = False, max_chars: int | None = None
) -> str:
    """``record[name]`` as a string (see :func:`field`) of at most ``max_chars`` characters (when given)."""
    value = field(record, name, path, location, allow_empty)
    if not isinstance(value, str):
        raise RecordError(path, location, name, f"expected a string, got {type(value).__name__}")
    if max_chars is not None:
        check_length(path, location, name, value, max_chars)
    return value
