"""Continued pre-training on plain text: ``.txt``/``.raw`` files (WikiText-2 raw), JSONL/JSON records or
Parquet/CSV/Arrow rows (``retention[hf]``) with a text field, a Hugging Face dataset, or the built-in prose
corpus. Passages are the paragraphs of a file (one document) or whole records (one document each)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from retention.data.readers import read_text
from retention.data.tasks.examples import TextExample
from retention.data.tasks.sources import convert_records, is_hub_source, local_file, read_records, text_field
from retention.prose import builtin_prose

if TYPE_CHECKING:
    from retention.data.readers import ReadReport
    from retention.data.tasks.task import TaskConfig

FIELDS = {"text": "text"}
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md", ".rst")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def split_passages(text: str) -> list[TextExample]:
    """Paragraphs of one document (any line ending), stripped, empty ones dropped. Paragraphs are separated
    by blank lines when the text has any, else each line is one (WikiText-2 raw: one paragraph per line)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = _BLANK_LINE.split(text) if _BLANK_LINE.search(text) else text.split("\n")
    return [TextExample(p.strip()) for p in parts if p.strip()]


def load(config: TaskConfig, report: ReadReport) -> list[TextExample]:
    """Passages of the configured source; malformed records go to ``report.reject``."""
    if config.source == "builtin":
        return split_passages(builtin_prose())
    if not is_hub_source(config.source) and local_file(config.source).suffix in TEXT_SUFFIXES:
        return split_passages(read_text(local_file(config.source)))
    # Records (hub rows, JSON/JSONL objects) are whole documents; blank ones (WikiText's empty rows) are left
    # out (counted in report.dropped).
    name, where = config.field("text"), config.source

    def text(loc: str, r: Any) -> str:
        return text_field(r, name, where, loc, allow_empty=True).strip()

    records = read_records(where, config.hf_config, config.hf_split, TEXT_SUFFIXES, report)
    texts = convert_records(records, text, report)
    examples = [TextExample(t, document=i) for i, t in enumerate(texts) if t]
    report.dropped += len(texts) - len(examples)
    return examples
