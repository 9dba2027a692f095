"""Atomic file writing: a reader never sees a half-written result, and a killed writer's leftovers are found;
strict JSON (no bare ``NaN``).

A temporary is written beside its target as ``.<name>.<random>.tmp<pid>`` and renamed over the target when done;
:func:`remove_stale_temporaries` removes the ones left by writers that died. :func:`lock_folder` makes a
folder one process's own for as long as it writes there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.=-]+")
_TEMPORARY = re.compile(r"\.tmp(\d*)$")
"""The end of a temporary's name: ``.tmp<pid>`` names its writer; a bare ``.tmp`` (a writer unknown) is removed
only once stale."""
STALE_AFTER_S = 3600
"""A temporary untouched for this long is stale even when a process with its writer's pid is running."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _new_temporary(path: Path, folder: bool) -> Path:
    """A new file or folder beside ``path``, created with the modes the umask leaves (0644 / 0755 under 022)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{os.getpid()}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (an empty folder when ``folder``); it replaces ``path`` when
    the block ends without error. Files end up with the mode the umask gives a new file (0644 under 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path, folder)
    file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
    try:
        yield tmp
        # Writers that replace the temporary (safetensors' save_file) leave private files; results are not.
        for entry in [tmp, *(tmp.rglob("*") if folder else ())]:
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, file_mode)
        if folder and path.is_dir():
            # A folder cannot be renamed over a non-empty one: the old one is moved aside (a temporary) first.
            old = _new_temporary(path, folder=True)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_modified(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries of interrupted atomic writes directly in ``folder``: those whose writer (the pid in
    their name) is no longer running, and any untouched for :data:`STALE_AFTER_S`. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY.search(entry.name)
        if match is None:
            continue
        pid = int(match[1]) if match[1] else None
        try:
            stale = (pid is not None and not _running(pid)) or time.time() - _last_modified(entry) > STALE_AFTER_S
        except FileNotFoundError:  # its writer finished (or another sweep removed it) meanwhile
            continue
        if stale:
            _remove(entry)
            removed.append(entry)
            log.warning("removed %s, the temporary of an interrupted write", entry)
    return removed


LOCK = ".lock"
"""The lock file of a run or study folder. It stays when released: deleting it could let two processes each
lock a file of that name."""


class FolderLocked(RuntimeError):
    """A folder another process holds the lock of; names the folder."""


def lock_folder(folder: str | Path, what: str) -> FileLock:
    """Take ``<folder>/.lock`` (creating the folder), without waiting: held until released or the process
    ends, however it ends. Raises :class:`FolderLocked` when another process (or another lock in this one)
    holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLocked(f"{folder} is in use by another {what} (that process holds {folder / LOCK}): wait "
                           "for it to end, or stop it first") from None
    return lock


def empty_folder(folder: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in ``folder`` but the entries named in ``keep``."""
    for entry in Path(folder).iterdir():
        if entry.name not in keep:
            _remove(entry)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf), however deeply nested in dicts, lists and tuples,
    replaced by None: what strict JSON can hold (docs/formats.md, "JSON")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def nan_for_null(obj: dict, fields: Iterable[str]) -> dict:
    """``obj`` with those of ``fields`` that hold null (a non-finite number, as :func:`finite` writes it) as NaN,
    for a reader that computes with them."""
    return {**obj, **{name: math.nan for name in fields if name in obj and obj[name] is None}}


def json_text(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """``obj`` as strict JSON (non-finite numbers as ``null``, see :func:`finite`; other objects as ``str``).
    ``allow_nan=False``: a NaN that reaches the encoder some other way is an error, never a bare ``NaN``."""
    return json.dumps(finite(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str,
                      allow_nan=False)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (:func:`json_text`) to ``path`` atomically."""
    return atomic_write_text(path, json_text(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` as strict JSON lines (:func:`json_text`) to ``path`` atomically."""
    return atomic_write_text(path, "".join(json_text(r) + "\n" for r in rows))


def safe_name(text: str) -> str:
    """``text`` as one path component that stays inside its folder: runs of other characters than letters,
    digits, ``_ . = -`` (path separators included) become ``_``, and names of only dots get a leading ``_``."""
    name = _UNSAFE.sub("_", str(text)) or "_"
    return f"_{name}" if set(name) == {"."} else name
