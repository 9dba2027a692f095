"""Named text corpora: what a corpus spec such as an editor's ``mom2_corpus`` reads.

A spec is one of

- ``builtin``: the project's built-in prose corpus (:func:`retention.prose.builtin_prose`), no download;
- ``wikitext2``: the WikiText-2 test split of the shared data folder (``<data>/wikitext/wiki.test.raw``), where
  ``<data>`` is ``$RETENTION_DATA`` when set, else ``../shared/data`` beside a source checkout of this project;
- ``hf:<id>[:config]``: a Hugging Face dataset's ``train`` split, ``text`` field (needs ``retention[hf]`` and a
  network);
- a text file: absolute, with environment variables expanded (``$RETENTION_DATA/wikitext/wiki.test.raw``), or
  relative. A relative path in a preset or hyperparameter file is relative to that file (:func:`anchor`); one
  given on the command line, relative to the current directory.

:func:`corpus_text` returns the text and an identity string for cache keys that depends on the content, not on
where the file lies (``wikitext2`` and the path of the same file give the same identity).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retention.prose import builtin_prose

BUILTIN = "builtin"
WIKITEXT2 = "wikitext2"
HF_PREFIX = "hf:"
HF_EXTRA = "pip install 'retention[hf]'"
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""Table files read through ``datasets`` (``retention[hf]``)."""
NAMED = (BUILTIN, WIKITEXT2)
DATA_ENV = "RETENTION_DATA"
"""Environment variable naming the shared data folder (the one holding ``wikitext/``, ``counterfact/``, ...)."""
WIKITEXT2_FILE = Path("wikitext") / "wiki.test.raw"

_CHECKOUT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$RETENTION_DATA``, else ``../shared/data`` beside a source checkout (a folder
    holding ``pyproject.toml`` and this package); None when neither applies."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    if (_CHECKOUT / "pyproject.toml").is_file():
        candidate = _CHECKOUT.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def wikitext2_path(what: str = "corpus") -> Path:
    """The WikiText-2 test split; FileNotFoundError saying what to set when it is absent (``what``: the setting
    that named it, for the message)."""
    data = shared_data_dir()
    if data is None:
        raise FileNotFoundError(
            f"{what} '{WIKITEXT2}' needs the shared data folder: set {DATA_ENV} to the folder holding "
            f"{WIKITEXT2_FILE} (or use 'builtin' or a text file)")
    path = data / WIKITEXT2_FILE
    if not path.is_file():
        how = f"${DATA_ENV}={os.environ[DATA_ENV]}" if os.environ.get(DATA_ENV) else "beside the checkout"
        raise FileNotFoundError(
            f"{what} '{WIKITEXT2}': {path} does not exist (shared data folder {data}, {how}); set {DATA_ENV} to the "
            f"folder holding {WIKITEXT2_FILE} (or use 'builtin' or a text file)")
    return path


def is_named(spec: str) -> bool:
    """A corpus name or hub source rather than a path."""
    return spec in NAMED or spec.startswith(HF_PREFIX)


def anchor(spec: str, base: str | Path) -> str:
    """``spec`` as written in a file inside folder ``base``: a plain relative path becomes ``base / spec``;
    names, hub sources, absolute paths and paths with ``$VAR`` or ``~`` are left for :func:`corpus_path`."""
    if is_named(spec) or "$" in spec or spec.startswith("~") or Path(spec).is_absolute():
        return spec
    return str(Path(base) / spec)


def corpus_path(spec: str, what: str = "corpus") -> Path:
    """The file a path spec names: environment variables and ``~`` expanded, a relative path taken from the
    current directory. FileNotFoundError naming an unset variable or a missing file."""
    expanded = os.path.expanduser(os.path.expandvars(spec))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise FileNotFoundError(f"{what} {spec!r}: environment variable {', '.join(unset)} is not set")
    path = Path(expanded)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"{what} {spec!r} is not a file{where}, '{BUILTIN}', '{WIKITEXT2}' or 'hf:<dataset id>'")
    return path


def _file_text(path: Path) -> tuple[str, str]:
    """A text file's text, or the ``text`` column of a Parquet/CSV/Arrow table joined by blank lines."""
    data = path.read_bytes()
    identity = f"file:{path.name}:{hashlib.blake2b(data, digest_size=8).hexdigest()}"
    if path.suffix not in TABLE_SUFFIXES:
        return data.decode("utf-8", errors="replace"), identity
    rows = [record for _, record in read_table_records(path)]
    if rows and "text" not in rows[0]:
        raise ValueError(f"corpus {path}: a table corpus needs a 'text' column (columns: {', '.join(rows[0])})")
    return "\n\n".join(r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()), identity


def import_datasets(what: str):
    """The ``datasets`` module, or an ImportError saying that ``what`` needs it and how to install it."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{what} needs the 'datasets' package: {HF_EXTRA} (or give a JSON/JSONL file, or use 'builtin')"
        ) from None
    return datasets


def read_hub_records(source: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs of a Hugging Face dataset ``hf:<id>`` (needs ``datasets`` and a network)."""
    datasets = import_datasets(f"task data {source}")
    name = source[len(HF_PREFIX) :]
    ds = datasets.load_dataset(name, config, split=split)
    for i, record in enumerate(ds):
        yield f"{split}[{i}]", record


def read_table_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs (``row <i>``, a dict per row) of a local Parquet, CSV or Arrow file, read
    through ``datasets`` in memory (its cache files go to a temporary folder that is removed)."""
    import tempfile

    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: not a table file (expected {', '.join(TABLE_SUFFIXES)})")
    datasets = import_datasets(f"data file {path}")
    with tempfile.TemporaryDirectory(prefix="retention-datasets-") as tmp:
        if path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path), in_memory=True)
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=tmp, keep_in_memory=True)
        else:
            ds = datasets.Dataset.from_csv(str(path), cache_dir=tmp, keep_in_memory=True)
        rows = list(ds)
    for i, record in enumerate(rows):
        yield f"row {i}", record


def _hub_text(spec: str, min_chars: int | None, what: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(f"{what} {spec!r} needs the 'datasets' package: pip install 'retention[hf]' "
                          f"(or use '{BUILTIN}', '{WIKITEXT2}' or a text file)")
    source, _, config = spec[len(HF_PREFIX):].partition(":")
    parts, size = [], 0
    for _, record in read_hub_records(f"{HF_PREFIX}{source}", config or None, "train"):
        text = record.get("text", "") if isinstance(record, dict) else ""
        if text.strip():
            parts.append(text)
            size += len(text)
        if min_chars is not None and size >= min_chars:
            break
    return "\n\n".join(parts)


def corpus_text(spec: str, min_chars: int | None = None, what: str = "corpus") -> tuple[str, str]:
    """The text of corpus ``spec`` (a hub corpus is read until it has ``min_chars``) and an identity string for
    cache keys: ``builtin:<content hash>``, ``file:<file name>:<content hash>`` (also for ``wikitext2``) or the
    hub spec itself. ``what`` names the setting the spec came from in error messages."""
    if spec == BUILTIN:
        text = builtin_prose()
        return text, f"{BUILTIN}:{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
    if spec == WIKITEXT2:
        return _file_text(wikitext2_path(what))
    if spec.startswith(HF_PREFIX):
        return _hub_text(spec, min_chars, what), spec
    return _file_text(corpus_path(spec, what))
