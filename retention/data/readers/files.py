"""Data files as text: UTF-8 decoding, line splitting, JSON and JSONL parsing with errors that name the file and
the line. The task readers (``retention.data.tasks``) use them too."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any

from retention.data.readers.common import ReadReport
from retention.records import RecordError


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


def parse_text(path: str, text: str, report: ReadReport) -> list[tuple[int | str, Any]]:
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
