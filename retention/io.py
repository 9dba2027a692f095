"""Atomic file writing: a reader never sees a half-written result, and a killed writer's leftovers are found.

A temporary is written beside its target as ``.<name>.<random>.tmp<pid>`` and renamed over the target when done;
:func:`remove_stale_temporaries` removes the ones left by writers that died. :func:`lock_folder` makes a
folder one process's own for as long as it writes there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.=-]+")
_TEMPORARY = re.compile(r"\.tmp(\d*)$")
"""Temporaries of this module (``.tmp<pid>``), of its earlier versions (``.tmp``) and of the caches' earlier
hand-rolled writers (``<name>.tmp<pid>``)."""
STALE_AFTER_S = 3600
"""A temporary untouched for this long is stale even when a process with its writer's pid is running."""
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (os.umask can only be read by setting it)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (an empty folder when ``folder``); it replaces ``path`` when
    the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name}.", f".tmp{os.getpid()}"
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp make private entries; results are as readable as any other file
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_UMASK)
    try:
        yield tmp
        # Writers that replace the temporary (safetensors' save_file) leave private files; results are not.
        for entry in [tmp, *(tmp.rglob("*") if folder else ())]:
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, 0o666 & ~_UMASK)
        if folder and path.is_dir():
            # A folder cannot be renamed over a non-empty one: the old one is moved aside (a temporary) first.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
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


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def safe_name(text: str) -> str:
    """``text`` as one path component that stays inside its folder: runs of other characters than letters,
    digits, ``_ . = -`` (path separators included) become ``_``, and names of only dots get a leading ``_``."""
    name = _UNSAFE.sub("_", str(text)) or "_"
    return f"_{name}" if set(name) == {"."} else name
