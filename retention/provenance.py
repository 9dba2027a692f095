"""What produced a result: the code, the locked environment, the corpora and the base model.

Every result (a run's ``summary.json``, ``retention edit``'s ``scores.json``, a study's ``study.json`` and the W&B
config) carries a ``provenance`` block:

- ``code``: the retention version and, when it runs from a git checkout, the commit and whether the tree had
  uncommitted changes (``dirty``, with ``diff_sha256`` of ``git diff HEAD`` so two dirty trees can be told
  apart);
- ``lock_sha256``: the SHA-256 of the checkout's ``requirements.lock`` (None for an installed package);
- ``python``: the Python version (the built-in corpus depends on it);
- ``corpora``: per role (``task``: the fine-tuning text; ``mom2``: the key statistics) the spec and the SHA-256
  of the text read (None for a hub corpus, which has no fixed bytes);
- ``model``: the base model's name and weight fingerprint.

:func:`environment_key` and :func:`digest_conflicts` are what ``retention report`` checks before pooling runs:
one environment, and every corpus spec and model name read as the same bytes in every run. Corpora and models
that differ by name (an editor's key-statistics corpus, a grid over models) are conditions, not conflicts.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retention.diskcache import file_digest

CHECKOUT = Path(__file__).resolve().parents[1]
LOCK_FILE = CHECKOUT / "requirements.lock"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def code() -> dict[str, Any]:
    """The retention version, and the git commit and dirty state of the checkout it runs from (None outside
    one). Computed once per process."""
    from retention import __version__

    out: dict[str, Any] = {"retention": __version__, "commit": None, "dirty": None}
    if (CHECKOUT / ".git").exists() and (CHECKOUT / "pyproject.toml").is_file():
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        if commit is not None and status is not None:
            out["commit"] = commit.strip()
            out["dirty"] = bool(status.strip())
            if out["dirty"]:
                diff = _git("diff", "HEAD") or ""
                out["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    return out


def lock_sha256() -> str | None:
    """The SHA-256 of the checkout's lock file, or None when running from an installed package."""
    return file_digest(LOCK_FILE) if LOCK_FILE.is_file() else None


@functools.lru_cache(maxsize=1)
def _builtin_sha256() -> str:
    from retention.prose import builtin_prose, text_digest

    return text_digest(builtin_prose())


def corpus(spec: str) -> dict[str, Any]:
    """``{"spec", "sha256"}`` of a corpus or task source spec: the built-in corpus's text digest, a local
    file's (``wikitext2`` is its file), None for a hub source or a spec that does not resolve here."""
    from retention.corpus import HF_PREFIX, WIKITEXT2, corpus_path, wikitext2_path

    if spec == "builtin":
        return {"spec": spec, "sha256": _builtin_sha256()}
    if spec.startswith(HF_PREFIX):
        return {"spec": spec, "sha256": None}
    try:
        path = wikitext2_path() if spec == WIKITEXT2 else corpus_path(spec)
    except FileNotFoundError:
        return {"spec": spec, "sha256": None}
    return {"spec": spec, "sha256": file_digest(path)}


def provenance(corpora: dict[str, str | None] | None = None, model: str | None = None,
               fingerprint: str | None = None) -> dict[str, Any]:
    """The provenance block of a result: ``corpora`` maps a role (``task``, ``mom2``) to the spec it used."""
    return {
        "code": code(),
        "lock_sha256": lock_sha256(),
        "python": platform.python_version(),
        "corpora": {role: corpus(spec) for role, spec in (corpora or {}).items() if spec},
        "model": {"name": model, "fingerprint": fingerprint},
    }


def environment_key(block: dict[str, Any] | None) -> tuple:
    """What must agree for two results to be pooled at all: code (version, commit, uncommitted diff), lock and
    Python. Results without a block share one key (recorded before provenance existed)."""
    if not block:
        return ("unrecorded",)
    c = block.get("code", {})
    return (c.get("retention"), c.get("commit"), c.get("diff_sha256"), block.get("lock_sha256"), block.get("python"))


def pooling_key(block: dict[str, Any] | None) -> tuple:
    """The whole provenance as a key: the environment, the corpus digests by role and the base model's
    fingerprint (runs of one study may differ in corpora or model by design, as grid values)."""
    if not block:
        return environment_key(block)
    corpora = tuple(sorted((role, (v or {}).get("spec"), (v or {}).get("sha256"))
                           for role, v in block.get("corpora", {}).items()))
    model = block.get("model") or {}
    return environment_key(block) + (corpora, model.get("name"), model.get("fingerprint"))


def digest_conflicts(blocks: Iterable[dict[str, Any] | None]) -> list[str]:
    """Corpus specs (per role) and model names that read different bytes in different results: the data
    changed under the same name."""
    seen: dict[tuple[str, Any], set] = {}
    for block in filter(None, blocks):
        for role, v in block.get("corpora", {}).items():
            seen.setdefault((role, (v or {}).get("spec")), set()).add((v or {}).get("sha256"))
        model = block.get("model") or {}
        seen.setdefault(("model", model.get("name")), set()).add(model.get("fingerprint"))
    return [f"{role} {name!r} has {len(digests)} different digests "
            f"({', '.join(sorted(str(d)[:12] for d in digests))})"
            for (role, name), digests in seen.items() if len(digests) > 1]


def describe(block: dict[str, Any] | None) -> str:
    """One line naming a provenance block: code, Python, corpora, model."""
    if not block:
        return "no provenance recorded"
    c = block.get("code", {})
    commit = (c.get("commit") or "no checkout")[:10] + (" (dirty)" if c.get("dirty") else "")
    corpora = ", ".join(f"{role} {v.get('spec')} {str(v.get('sha256') or 'no digest')[:12]}"
                        for role, v in block.get("corpora", {}).items())
    model = block.get("model") or {}
    return (f"retention {c.get('retention')} {commit}, Python {block.get('python')}, lock "
            f"{str(block.get('lock_sha256') or 'none')[:12]}, corpora: {corpora or 'none'}, model "
            f"{model.get('name')} {model.get('fingerprint') or ''}".rstrip())
