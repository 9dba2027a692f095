"""Read knowledge records from CounterFact, zsRE, the built-in set or our own record files.

The format is detected from the content, never from the file name:

- ``counterfact``: CounterFact in the ROME/MEMIT format (``requested_rewrite{prompt, subject, relation_id,
  target_new{str}, target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``generation_prompts``). Neighbourhood prompts given as plain strings expect the record's ``target_true``.
- ``easyedit``: EasyEdit's flat format (``prompt`` is a full sentence containing ``subject``, ``target_new``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``). The template is the
  prompt with the first occurrence of the subject replaced by ``{}``; the relation id is unknown (``""``).
- ``knowedit``: KnowEdit (EasyEdit's benchmark: ``subject``, ``prompt`` (or ``src``), ``target_new``,
  ``ground_truth`` (a string, a list of answers or a list of alias lists), ``rephrase``/``rephrase_prompt``,
  ``locality{<kind>: [{prompt, ground_truth}]}``, ``portability{<kind>: [{prompt, ground_truth}]}``). Rephrases
  are evaluation paraphrases, every locality prompt (``Relation_Specificity``, ``Forgetfulness``, ...) a
  neighbourhood prompt, every portability prompt (``Reasoning``, ``Subject_Aliasing``,
  ``Logical_Generalization``, ...) a ``portability`` probe expecting its ground truth (its alternative for
  ``prob`` is ``ground_truth`` when the answer is ``target_new``, else none). The first answer of a list is the
  target; further answers (aliases) are not scored and are counted as ignored. A record without
  ``ground_truth`` (Wiki_recent inserts facts the model never knew) or without ``subject`` (WikiBio edits
  passages) is malformed: a retention run needs the old answer. The flat EasyEdit format is read by the same
  code, so it also accepts ``portability_prompt``/``portability_ground_truth``.
- ``mquake``: MQuAKE (``requested_rewrite`` as a list of CounterFact-style rewrites, ``questions``,
  ``answer``, ``new_answer``). A case with exactly one rewrite is one record: the rewrite is the edit, its
  ``question`` an evaluation paraphrase, and each multi-hop question a ``portability`` probe expecting
  ``new_answer`` against ``answer``. A case with several rewrites is malformed here: its multi-hop questions are
  answered only when all of its rewrites are edited into one model, while records are selected, split and (in
  ``single`` and ``sequential`` mode) edited one by one. ``on_error="skip"`` keeps the single-rewrite cases.
  ``single_hops``, ``new_single_hops``, ``orig`` and the answer aliases are not scored (counted as ignored).
- ``zsre``: zsRE in the MEND format (``subject``, ``src``, ``rephrase``, ``alt``, ``answers``, ``loc``,
  ``loc_ans``). See :data:`ZSRE_TARGETS` for the two conventions for the new target. The neighbourhood
  prompt is ``loc`` (an ``"nq question: ..."`` string) with a ``?`` appended, expecting ``loc_ans``.
- ``records``: our own format, a list of :meth:`KnowledgeRecord.to_dict` objects (the built-in set).

Files are UTF-8 (a leading BOM is dropped), a JSON array of records or JSONL (one JSON object per line), or a
Parquet, CSV or Arrow table read through ``datasets`` (``pip install 'retention[hf]'``; null values are absent
fields). ``hf:<dataset id>[:config]`` reads the ``train`` split of a Hugging Face dataset the same way (the
``datasets`` extra and a reachable hub, checked first; with ``HF_DATASETS_OFFLINE`` set, its local cache). Targets
are stripped of surrounding whitespace (the scorer adds the leading space itself). A malformed record, or a text
longer than ``max_prompt_chars``, raises :class:`RecordError` naming the file, the record and the field;
``on_error="skip"`` skips it and counts it in the :class:`ReadReport` instead. Errors of the file itself (not
UTF-8, invalid JSON array, no records) always raise. A field of a KnowEdit, EasyEdit or MQuAKE record that is
not used (an alias, an unknown key) is never dropped silently: :attr:`ReadReport.ignored` counts the records per
field, and the log names the file, the first such record and the field.

The file helpers (:func:`read_text`, :func:`parse_jsonl`, :class:`ReadReport`) serve the task readers too
(``retention.data.tasks.sources``), so both decode, split and skip the same way.

This package reads the source and detects the format; one module per format converts a record
(:mod:`~retention.data.readers.counterfact` with MQuAKE, :mod:`~retention.data.readers.easyedit` with KnowEdit,
:mod:`~retention.data.readers.zsre`, :mod:`~retention.data.readers.records`), on what they share
(:mod:`~retention.data.readers.common`: the report, field access, the checks every record passes) and the file
helpers (:mod:`~retention.data.readers.files`). Import from the package: its names are the public ones.
"""

from __future__ import annotations

import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from retention.corpus import (
    HF_PREFIX,
    TABLE_SUFFIXES,
    corpus_problem,
    import_datasets,
    read_hub_records,
    read_table_records,
)
from retention.data.readers.common import (
    MAX_PROMPT_CHARS,
    ON_ERROR,
    Raw,
    ReadReport,
    check_length,
    short,
    validate,
)
from retention.data.readers.counterfact import from_counterfact, from_mquake
from retention.data.readers.easyedit import from_easyedit
from retention.data.readers.files import (
    decode_text,
    json_error,
    load_json,
    parse_jsonl,
    parse_text,
    read_text,
    split_lines,
)
from retention.data.readers.records import from_records
from retention.data.readers.zsre import ZSRE_TARGETS, from_zsre
from retention.records import KnowledgeRecord, RecordError

__all__ = ["BUILTIN_SETS", "MAX_PROMPT_CHARS", "ON_ERROR", "ZSRE_TARGETS", "ReadReport", "RecordError", "check_length",
           "decode_text", "json_error", "load_json", "load_records", "parse_jsonl", "read_records", "read_text",
           "split_lines"]

log = logging.getLogger(__name__)

BUILTIN_SETS = {"builtin": "builtin_facts.json"}
"""Names of knowledge sets shipped in ``retention/resources``."""


# Detection: the first key of each signature that a record has decides its file's format.
_FORMATS = {
    "mquake": (("new_answer", "questions"), from_mquake),
    "counterfact": (("requested_rewrite",), from_counterfact),
    "zsre": (("src", "alt", "answers"), from_zsre),
    "records": (("target_true",), from_records),
    "knowedit": (("portability", "locality"), from_easyedit),
    "easyedit": (("ground_truth",), from_easyedit),
}


def _record_format(item: Any) -> str | None:
    if isinstance(item, dict):
        for name, (keys, _) in _FORMATS.items():
            if any(k in item for k in keys):
                return name
    return None


def _detect(path: str, items: list[tuple[int | str, Any]]) -> str:
    """The format most records have (the earliest of a tie), so a malformed first record cannot decide it."""
    votes: dict[str, int] = {}
    for _, item in items:
        name = _record_format(item)
        if name is not None:
            votes[name] = votes.get(name, 0) + 1
    if votes:
        return max(votes, key=lambda name: votes[name])  # max keeps the first of equal counts
    hints = "; ".join(f"{name}: {', '.join(keys)}" for name, (keys, _) in _FORMATS.items())
    raise RecordError(path, "-", "<format>", f"no record has a key that tells the format ({hints})")


def _resolve(path_or_name: str | Path) -> tuple[str, str]:
    """(display path, text) of a file or a built-in set name."""
    name = str(path_or_name)
    path = Path(name).expanduser()
    if path.is_file():
        display, data = str(path), path.read_bytes()
    elif name in BUILTIN_SETS and not path.exists():
        res = resources.files("retention") / "resources" / BUILTIN_SETS[name]
        display, data = f"<{name}>", res.read_bytes()
    elif path.is_dir():
        raise IsADirectoryError(f"{name}: is a folder; give a JSON or JSONL file of knowledge records")
    else:
        raise FileNotFoundError(
            f"{name}: no such file, and not a built-in knowledge set (built-in: {', '.join(BUILTIN_SETS)})"
        )
    return display, decode_text(data, display)


def _table_items(path: str) -> list[tuple[int | str, Any]]:
    """(index, row) of a Parquet/CSV/Arrow file (through ``datasets``; KnowEdit's hub files are Parquet). A null
    column value is an absent field: a table has every column in every row."""
    return [(i, {k: v for k, v in row.items() if v is not None}) for i, (_, row) in enumerate(read_table_records(path))]


def _hub_items(spec: str) -> list[tuple[int | str, Any]]:
    """(index, record) of the ``train`` split of the Hugging Face dataset ``hf:<id>[:config]``; an ImportError
    (``datasets`` missing) or a FileNotFoundError (hub unreachable, no such dataset) naming ``spec`` and the fix."""
    import_datasets(f"knowledge source {spec}")
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):  # offline: the local cache may serve it
        problem = corpus_problem(f"{HF_PREFIX}{name}", "knowledge source")
        if problem is not None:
            raise FileNotFoundError(f"{spec}: {problem[0]}; {problem[1]}")
    try:
        return [(i, record) for i, (_, record) in enumerate(read_hub_records(f"{HF_PREFIX}{name}", config or None,
                                                                              "train"))]
    except Exception as err:  # datasets raises its own types (DatasetNotFoundError, ConnectionError, ...)
        raise FileNotFoundError(f"{spec}: the dataset's train split could not be read ({type(err).__name__}: "
                                f"{err}); give hf:<dataset id>[:config] or a JSON/JSONL file") from None


def read_records(
    path_or_name: str | Path,
    on_error: str = "raise",
    limit: int | None = None,
    zsre_target: str = "alt",
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> tuple[list[KnowledgeRecord], ReadReport]:
    """Read knowledge records and a :class:`ReadReport` of what was read and skipped.

    ``path_or_name`` is a file or the name of a built-in set (``"builtin"``); ``on_error`` is ``"raise"``
    or ``"skip"``; ``limit`` keeps the first N good records; ``zsre_target`` names the zsRE convention;
    ``max_prompt_chars`` is the longest text of a record (prompt, subject, target, ...), in characters.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: choose from {', '.join(ON_ERROR)}")
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(f"zsre_target={zsre_target!r}: choose from {', '.join(ZSRE_TARGETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}: must be >= 0")
    if max_prompt_chars < 1:
        raise ValueError(f"max_prompt_chars={max_prompt_chars}: must be >= 1")
    t0 = time.perf_counter()
    if str(path_or_name).startswith(HF_PREFIX):
        path = str(path_or_name)
        report = ReadReport(path, on_error=on_error)
        items = _hub_items(path)
    elif Path(str(path_or_name)).suffix in TABLE_SUFFIXES and Path(path_or_name).expanduser().is_file():
        path = str(Path(path_or_name).expanduser())
        report = ReadReport(path, on_error=on_error)
        items = _table_items(path)
    else:
        path, text = _resolve(path_or_name)
        report = ReadReport(path, on_error=on_error)
        items = parse_text(path, text, report)
    if not items and not report.skipped:
        raise RecordError(path, "-", "<file>", "no records")
    report.format = _detect(path, items) if items else ""
    convert = _FORMATS[report.format][1] if items else None
    records: list[KnowledgeRecord] = []
    seen: set[str] = set()
    for index, item in items:
        if limit is not None and len(records) >= limit:
            break
        try:
            rec, raw = _convert(path, index, item, convert, zsre_target, seen, max_prompt_chars)
        except RecordError as err:
            report.reject(err)
            continue
        for name, why in raw.notes:
            report.ignore(path, raw.ref, name, why)
        seen.add(rec.case_id)
        records.append(rec)
    report.read, report.seconds = len(records), time.perf_counter() - t0
    (log.warning if report.skipped or report.ignored else log.info)(report.summary())
    return records, report


def _convert(path, index, item, convert, zsre_target: str, seen: set[str], max_chars: int,
             ) -> tuple[KnowledgeRecord, Raw]:
    if not isinstance(item, dict):
        raise RecordError(path, index, "<record>", f"expected a JSON object, got {type(item).__name__}")
    cid = item.get("case_id", index)
    raw = Raw(path, index if "case_id" not in item else f"{index} (case_id {short(cid)})", item)
    if not isinstance(cid, (int, str)) or isinstance(cid, bool) or str(cid).strip() == "":
        raise raw.error("case_id", f"expected a non-empty int or str, got {short(cid)}")
    if str(cid) in seen:
        raise raw.error("case_id", f"duplicate case_id {short(cid)}")
    rec = convert(raw, str(cid), zsre_target)
    validate(raw, rec, max_chars)
    return rec, raw


def load_records(
    path_or_name: str | Path,
    on_error: str = "raise",
    limit: int | None = None,
    zsre_target: str = "alt",
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> list[KnowledgeRecord]:
    """Knowledge records of a file or built-in set (see :func:`read_records`; skipped records are logged)."""
    return read_records(path_or_name, on_error=on_error, limit=limit, zsre_target=zsre_target,
                        max_prompt_chars=max_prompt_chars)[0]
