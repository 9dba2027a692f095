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

A setting may name a list of specs, tried in order: :func:`resolve_corpus` picks the first that can be read here
without a download first, before any model is loaded.

:func:`corpus_text` returns the text and an identity string for cache keys that depends on the content, not on
where the file lies (``wikitext2`` and the path of the same file give the same identity).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator, Sequence
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

HUB_TIMEOUT = 3.0
"""Seconds :func:`corpus_problem` waits for the hub to answer."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

_CHECKOUT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


class CorpusUnavailableError(ValueError):
    """No spec a corpus setting names can be read here; the message names the setting, each spec with why, and
    the fix."""


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


def read_hub_records(source: str, config: str | None, split: str,
                     streaming: bool = False) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` pairs of a Hugging Face dataset ``hf:<id>`` (needs ``datasets`` and a network);
    ``streaming``: read records as they arrive instead of downloading the whole split first."""
    datasets = import_datasets(f"task data {source}")
    name = source[len(HF_PREFIX) :]
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
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
    # Streamed: a corpus such as Wikipedia is read only as far as min_chars, never downloaded whole.
    for _, record in read_hub_records(f"{HF_PREFIX}{source}", config or None, "train", streaming=True):
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


def _offline() -> str | None:
    """The first of :data:`OFFLINE_ENV` set to a true value (as ``huggingface_hub`` reads them), else None."""
    return next((name for name in OFFLINE_ENV
                 if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


@functools.lru_cache(maxsize=None)
def _hub_problem(endpoint: str, dataset: str) -> tuple[str, str] | None:
    """One HEAD request to the hub's page of ``dataset`` (cached for the process)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{endpoint}/api/datasets/{dataset}"
    try:
        status = get_session().head(url, headers=build_hf_headers(), timeout=HUB_TIMEOUT).status_code
    except Exception as err:  # requests or httpx, by huggingface_hub's version: any failure means not reachable
        return (f"the hub {endpoint} could not be reached ({type(err).__name__}, timeout {HUB_TIMEOUT:g} s)",
                "connect to the network (or export HF_ENDPOINT=<a reachable mirror>)")
    if status in (401, 403, 404):
        return (f"the hub has no public dataset {dataset!r} (HTTP {status})",
                "hf auth login (if it is gated or private), or correct the dataset id")
    if status >= 500:
        return f"the hub {endpoint} answered HTTP {status}", "try again later"
    return None


def corpus_problem(spec: str, what: str = "corpus") -> tuple[str, str] | None:
    """Why ``spec`` cannot be read here, and the one command that fixes it; None when it can. Nothing is
    downloaded. Checked:

    - ``builtin``: always readable;
    - ``wikitext2``: ``<data>/wikitext/wiki.test.raw`` exists (:func:`shared_data_dir`);
    - a file: it exists (environment variables set); a Parquet/CSV/Arrow table also needs ``datasets``;
    - ``hf:<id>[:config]``: ``datasets`` is importable, neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` is
      set (the corpus is streamed, so a local cache does not serve it), and a HEAD request to
      ``<HF_ENDPOINT>/api/datasets/<id>`` answers within :data:`HUB_TIMEOUT` seconds with neither 401, 403, 404
      nor 5xx (once per dataset and process). The config is not checked.
    """
    if spec == BUILTIN:
        return None
    if spec == WIKITEXT2:
        fix = f"export {DATA_ENV}=<folder holding {WIKITEXT2_FILE}>"
        data = shared_data_dir()
        if data is None:
            return f"no shared data folder (${DATA_ENV} is unset and there is no ../shared/data beside a checkout)", fix
        if not (data / WIKITEXT2_FILE).is_file():
            return f"{data / WIKITEXT2_FILE} does not exist", fix
        return None
    if spec.startswith(HF_PREFIX):
        if importlib.util.find_spec("datasets") is None:
            return "the 'datasets' package is not installed", HF_EXTRA
        if (name := _offline()) is not None:
            return f"{name}={os.environ[name]} is set (a hub corpus is streamed from the network)", f"unset {name}"
        from huggingface_hub import constants

        dataset = spec[len(HF_PREFIX):].partition(":")[0]
        return _hub_problem(os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/"), dataset)
    expanded = os.path.expanduser(os.path.expandvars(spec))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        return f"environment variable {', '.join(unset)} is not set", f"export {unset[0]}=<its value>"
    path = Path(expanded)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        return f"no such file{where}", f"create it, or name another corpus in {what}"
    if path.suffix in TABLE_SUFFIXES and importlib.util.find_spec("datasets") is None:
        return "a table file needs the 'datasets' package", HF_EXTRA
    return None


def corpus_specs(specs: str | Sequence[str], what: str = "corpus") -> list[str]:
    """``specs`` as a list of non-empty spec strings; ValueError naming ``what`` otherwise."""
    items = [specs] if isinstance(specs, str) else list(specs)
    if not items or not all(isinstance(s, str) and s.strip() for s in items):
        raise ValueError(f"{what}={specs!r}: give a corpus spec or a non-empty list of them "
                         f"('{BUILTIN}', '{WIKITEXT2}', 'hf:<id>[:config]' or a text file)")
    return items


def resolve_corpus(specs: str | Sequence[str], what: str = "corpus") -> str:
    """The first of ``specs`` (one spec or a list, in order of preference) that can be read here
    (:func:`corpus_problem`). Skipping one logs a warning naming it, why, and the spec used; when none can be
    read, a :class:`CorpusUnavailableError` names ``what``, every spec with why, and its fix."""
    skipped = []
    for spec in corpus_specs(specs, what):
        problem = corpus_problem(spec, what)
        if problem is None:
            if skipped:
                log.warning("%s: using %r; skipped %s", what, spec, "; ".join(skipped))
            return spec
        skipped.append(f"{spec!r} ({problem[0]}; fix: {problem[1]})")
    raise CorpusUnavailableError(
        f"{what}: no corpus it names can be read here, so the key statistics would fail after the model is "
        f"loaded: {'; '.join(skipped)}. Run one fix, or set {what} to '{BUILTIN}' (the built-in prose, no download)")
