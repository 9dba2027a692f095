"""The built-in plain-text corpus: English prose from the docstrings of the Python standard library.

Its one source is the standard library of the running Python (``sysconfig``'s ``stdlib`` folder), parsed with
``ast`` and never imported, read in a sorted walk that skips tests, demos and any ``site-packages``: installing
or removing a package cannot change it. Paragraphs are cleaned (doctests, code blocks, field lists and markup
removed), kept only when they read like prose, and deduplicated. The same Python version gives the same bytes;
:func:`text_digest` of them identifies the corpus in results, and :data:`PINNED_DIGESTS` holds the digests of
the Python versions the published numbers were measured with. The result is cached under
``$RETENTION_CACHE/prose`` (its digest in a record beside it, checked on every read: a damaged file is rebuilt).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import platform
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from retention.diskcache import DiskCache
from retention.io import atomic_write_text
from retention.paths import cache_dir

log = logging.getLogger(__name__)

_VERSION = 2
"""Bump when the extraction rules change, so cached corpora are rebuilt."""
MIN_BYTES = 900_000
"""The least prose the standard library must give (a shortfall is an error, not a silently smaller corpus)."""
PINNED_DIGESTS = {
    "3.11.7": "7590a567d5b1b15b98ebca4a480654d5e2a24b36e7e420f1faa643688b4e13d0",
}
"""SHA-256 of the built-in corpus by Python version (``platform.python_version()``): the README's and docs'
numbers were measured on these."""
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages",
              "__pycache__", "ensurepip"}

_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^`>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`_{0,2}")
_EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|__([^_]+)__")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S+|www\.\S+")
_HEADING_RULE = re.compile(r"^\s*([=\-~^*#+`'\".:_])\1{2,}\s*$")
_CODE_CHARS = re.compile(r"[{}\[\]=<>|\\@$;#]|->|\w\(|\w_\w")


def _clean_paragraph(block: list[str]) -> str | None:
    """One paragraph as a single line of plain prose, or None when it does not read like prose."""
    if not block or block[0][:1].isspace():  # indented: a code or literal block
        return None
    lines = []
    for line in block:
        stripped = line.strip()
        if stripped.startswith((">>>", "...", "$ ", "```", ".. ", ":param", ":return", ":raise", ":type", "|")):
            break  # prose before a doctest/directive/field list is kept, the rest of the block is not
        if _HEADING_RULE.match(stripped) or stripped.startswith("#"):
            continue
        lines.append(stripped)
    text = " ".join(lines)
    text = _MD_LINK.sub(r"\1", _URL.sub("", text))
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2) or m.group(3), text)
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    # A paragraph ending in ":" introduces the code or list just removed, so it is dropped with it.
    if len(words) < 6 or text[-1] not in ".!?" or not text[0].isupper():
        return None
    letters = sum(c.isalpha() for c in text)
    if letters < 0.75 * sum(not c.isspace() for c in text):
        return None
    if len(_CODE_CHARS.findall(text)) > len(words) / 6:
        return None
    return text


def paragraphs(text: str) -> Iterator[str]:
    """Cleaned prose paragraphs of a docstring or documentation file (blocks separated by blank lines)."""
    block: list[str] = []
    for line in text.expandtabs().splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        cleaned = _clean_paragraph(block)
        if cleaned:
            yield cleaned
        block = []


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _walk(root: Path) -> Iterator[Path]:
    """The ``.py`` files under ``root`` in sorted order, skipping tests, demos, caches and installed packages."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def stdlib_root() -> Path:
    """The standard library folder of the running Python (the base installation's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_digest(text: str) -> str:
    """The SHA-256 hex digest of a text's UTF-8 bytes: a corpus's identity in results."""
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_key(min_bytes: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{_VERSION} {min_bytes} {sys.version} {stdlib_root()}".encode())
    return h.hexdigest()


def builtin_prose(min_bytes: int = MIN_BYTES, cache: Path | None = None) -> str:
    """The built-in corpus: every prose paragraph of the standard library's docstrings, separated by blank
    lines."""
    entries = DiskCache(cache or cache_dir() / "prose", name=lambda key: f"builtin-{key['corpus']}")
    entry = {"corpus": _cache_key(min_bytes)}
    path = entries.data_path(entry, ".txt")
    if entries.get(entry) is not None:
        return path.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    root = stdlib_root()
    seen: set[str] = set()
    kept: list[str] = []
    size = n_files = 0
    for file in _walk(root):
        n_files += 1
        for doc in _docstrings(file):
            for para in paragraphs(doc):
                key = re.sub(r"\W+", " ", para.lower())
                if key not in seen:
                    seen.add(key)
                    kept.append(para)
                    size += len(para.encode()) + 2
    if size < min_bytes:
        raise RuntimeError(f"the standard library at {root} gives only {size} bytes of prose (< {min_bytes}); "
                           "use a local text file as the task source instead")
    corpus = "\n\n".join(kept) + "\n"
    digest = text_digest(corpus)
    entries.put(entry, {"paragraphs": len(kept), "sha256": digest}, data=atomic_write_text(path, corpus))
    log.info("built-in prose: %d paragraphs from %d files of %s, %.2f MB, sha256 %s, in %.1f s -> %s",
             len(kept), n_files, root, size / 1e6, digest[:12], time.perf_counter() - t0, path)
    pinned = PINNED_DIGESTS.get(platform.python_version())
    if pinned is not None and pinned != digest:
        log.warning("the built-in corpus of Python %s has sha256 %s, not the pinned %s: numbers will differ from "
                    "the published ones", platform.python_version(), digest, pinned)
    return corpus
