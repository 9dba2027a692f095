"""The built-in plain-text corpus: English prose from the documentation already installed on the machine.

Sources, read in a sorted walk so the corpus is the same on every run of the same installation:
the docstrings of the Python standard library (parsed with ``ast``, never imported), then the ``.rst``,
``.md`` and ``.txt`` documentation files and docstrings of installed packages until the corpus reaches
``min_bytes``. Paragraphs are cleaned (doctests, code blocks, field lists and markup removed), kept only when
they read like prose, and deduplicated. The result is cached under ``$RETENTION_CACHE/prose`` (its digest in a
record beside it, checked on every read: a damaged file is rebuilt).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from retention.diskcache import DiskCache
from retention.io import atomic_write_text
from retention.models import cache_dir

log = logging.getLogger(__name__)

_VERSION = 1
"""Bump when the extraction rules change, so cached corpora are rebuilt."""
MIN_BYTES = 1_500_000
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages",
              "__pycache__", "examples", "benchmarks", "_vendor", "vendor", "third_party"}
_TEST_ONLY = ("hypothesis", "_hypothesis", "sortedcontainers")
"""Top-level names of test-only distributions (the ``dev`` extra's property-testing tool and its dependency),
left out so that installing the test tools changes neither the corpus nor any number measured on it."""
_DOC_SUFFIXES = {".rst", ".md", ".txt"}
_SKIP_DOC_NAMES = {"license", "licence", "copying", "notice", "authors", "record", "top_level", "entry_points",
                   "requirements", "changelog", "changes", "history", "news", "wheel", "installer"}

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


def _walk(root: Path, suffixes: set[str]) -> Iterator[Path]:
    """Files under ``root`` with one of ``suffixes``, in sorted order, skipping tests, caches and vendored code."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                             and not (dirpath == str(root) and d.startswith(_TEST_ONLY)))
        for name in sorted(filenames):
            if dirpath == str(root) and name.startswith(_TEST_ONLY):
                continue
            p = Path(dirpath) / name
            if p.suffix in suffixes or (p.name == "METADATA" and ".py" not in suffixes):
                yield p


def _sources() -> list[tuple[str, Path, set[str]]]:
    """(kind, root, suffixes) in reading order: stdlib docstrings, package docs, package docstrings."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    packages = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    out = [("stdlib docstrings", stdlib, {".py"})]
    out += [("package docs", p, _DOC_SUFFIXES) for p in packages]
    out += [("package docstrings", p, {".py"}) for p in packages]
    return out


def _texts(kind: str, path: Path) -> Iterator[str]:
    if path.suffix == ".py":
        yield from _docstrings(path)
        return
    if path.stem.lower() in _SKIP_DOC_NAMES or path.stat().st_size > 2_000_000:
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.name == "METADATA":  # the long description follows the headers
        text = text.partition("\n\n")[2]
    yield text


def _cache_key(min_bytes: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{_VERSION} {min_bytes} {sys.version}".encode())
    for _, root, _ in _sources():
        h.update(str(root).encode())
        if root.exists():
            installed = sorted(n for n in os.listdir(root) if not n.startswith(_TEST_ONLY))
            h.update(" ".join(installed).encode())  # installed distributions
    return h.hexdigest()


def builtin_prose(min_bytes: int = MIN_BYTES, cache: Path | None = None) -> str:
    """The built-in corpus: paragraphs separated by blank lines, at least ``min_bytes`` of UTF-8 when the
    installation has that much documentation (a shortfall is an error, not a silently smaller corpus)."""
    entries = DiskCache(cache or cache_dir() / "prose", name=lambda key: f"builtin-{key['corpus']}")
    entry = {"corpus": _cache_key(min_bytes)}
    path = entries.data_path(entry, ".txt")
    if entries.get(entry) is not None:
        return path.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    seen: set[str] = set()
    kept: list[str] = []
    size = 0
    for kind, root, suffixes in _sources():
        n_files = 0
        for file in _walk(root, suffixes):
            n_files += 1
            for text in _texts(kind, file):
                for para in paragraphs(text):
                    key = re.sub(r"\W+", " ", para.lower())
                    if key in seen:
                        continue
                    seen.add(key)
                    kept.append(para)
                    size += len(para.encode()) + 2
            if size >= min_bytes:
                break
        log.info("built-in prose: %s from %s: %d files, %.2f MB so far", kind, root, n_files, size / 1e6)
        if size >= min_bytes:
            break
    if size < min_bytes:
        raise RuntimeError(
            f"the installed documentation gives only {size} bytes of prose (< {min_bytes}); "
            "use a local text file as the task source instead"
        )
    corpus = "\n\n".join(kept) + "\n"
    entries.put(entry, {"paragraphs": len(kept)}, data=atomic_write_text(path, corpus))
    log.info("built-in prose: %d paragraphs, %.2f MB in %.1f s -> %s", len(kept), size / 1e6,
             time.perf_counter() - t0, path)
    return corpus
