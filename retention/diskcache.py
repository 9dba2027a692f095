"""Verified disk-cache entries, one mechanism for every cache under ``cache_dir()``.

An entry of a kind (``selection``, ``covariance``, ``models``...) is a JSON record ``<name>.json`` holding its key,
its payload, the size and SHA-256 of each of its data files and a digest of all of that, beside its data: tensors
in ``<name>.safetensors``, or a file or folder its owner writes at :meth:`DiskCache.data_path`. The record also
keeps the stamp (modification and change times in ns, inode) of each large data file as it stood once written.

Data is written first, the record last, each atomically, so a reader sees a whole entry or none; two processes
writing the same entry write the same data. On read the record must match its digest, its key the requested one
and every data file its recorded size. A data file below :data:`LARGE_FILE` bytes is hashed and must match its
recorded SHA-256; a larger one (covariances, converted models: gigabytes) is hashed only when its stamp differs
from the recorded one (rewritten, copied, touched; its stamp is then recorded anew): rewriting that much takes
longer than a clock tick, so it always moves the stamp. Anything else is logged with what was wrong and the entry
is ignored (the caller recomputes and overwrites it). A large file damaged without any change of its stamp (bit
rot, a disk error) is found by a full check: ``get(key, verify=True)`` or ``retention cache verify``
(:func:`verify_tree`). Opening a kind's folder removes the temporaries that
interrupted writes left there (:func:`retention.io.remove_stale_temporaries`).

Processes that may need the same entry at the same moment (the runs of ``retention study --jobs N``) read and
compute it under :meth:`DiskCache.lock`, an OS file lock, so one computes it and the others wait, then read it.
The OS drops the lock when its process ends, however it ends: a killed run leaves no lock held. The lock files
are kept out of the cache (under :data:`LOCKS`, named by a hash of the entry's path), so the cache holds entries
only; they exclude the processes of one machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from retention.io import atomic_path, atomic_write_json, json_text, remove_stale_temporaries

log = logging.getLogger(__name__)

_FIELDS = ("key", "payload", "files")
LARGE_FILE = 64 << 20
"""Data files at least this large are trusted on read while their stamp is the recorded one (and hashed once
per process by :func:`file_digest`); smaller ones are always hashed."""
LOCKS = Path(tempfile.gettempdir()) / "retention-locks"
"""Where the entries' lock files are (empty files; any may be deleted while no process runs)."""
_large_digests: dict[tuple, str] = {}
"""(path, size, mtime, inode) -> SHA-256 of the files of at least :data:`LARGE_FILE` bytes hashed by this
process."""


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def file_digest(path: str | Path, fresh: bool = False) -> str:
    """SHA-256 of a file's bytes (``fresh``: read them even when this process has hashed the file before)."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _large_digests and not fresh:
        return _large_digests[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if st.st_size >= LARGE_FILE:
        # A converted model is read several times per process (tokenizer, weights): it is hashed once.
        _large_digests[memo] = h.hexdigest()
    return h.hexdigest()


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from its JSON record."""
    return json.loads(json_text(obj))


def _stamp(st: os.stat_result) -> list[int]:
    """What moves when a file is rewritten, copied or touched: its mtime and ctime (ns) and inode."""
    return [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_record(path: Path) -> dict:
    """The record at ``path``, checked against its own digest (a ValueError says what is wrong)."""
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or any(f not in record for f in (*_FIELDS, "digest")):
        raise ValueError("not a whole record (an older format, or damaged)")
    if record["digest"] != digest({f: record[f] for f in _FIELDS}):
        raise ValueError("the record does not match its digest")
    return record


def _check_files(root: Path, record: dict, verify: bool) -> bool:
    """Raise ValueError naming a data file of ``record`` (relative to ``root``) that fails its checks: its
    size, and its SHA-256 when ``verify``, when it is small or when its stamp changed. Returns whether the
    stamp of a large file changed (and it passed)."""
    stamps = record.get("stamps", {})
    changed = False
    for name, expected in record["files"].items():
        st = (root / name).stat()
        if st.st_size != expected["size"]:
            raise ValueError(f"{name} has {st.st_size} bytes where {expected['size']} were written")
        moved = st.st_size >= LARGE_FILE and stamps.get(name) != _stamp(st)
        if verify or moved or st.st_size < LARGE_FILE:
            if file_digest(root / name, fresh=verify) != expected["sha256"]:
                raise ValueError(f"{name} does not match its recorded digest")
        changed |= moved
    return changed


def _write_record(root: Path, path: Path, body: dict) -> Path:
    """Write ``body`` (key, payload, files) as the record at ``path`` with its digest and the large files' stamps."""
    sizes = {name: (root / name).stat() for name in body["files"]}
    stamps = {name: _stamp(st) for name, st in sizes.items() if st.st_size >= LARGE_FILE}
    return atomic_write_json(path, {**body, "digest": digest(body), "stamps": stamps})


class DiskCache:
    """Entries of one kind under ``root``, named ``name(key)`` (by default a digest of the key)."""

    def __init__(self, root: str | Path, name: Callable[[dict], str] = digest):
        self.root = Path(root)
        self._name = name
        remove_stale_temporaries(self.root)

    def data_path(self, key: dict, suffix: str = "") -> Path:
        """Where the entry for ``key`` keeps data its owner writes (a file or a folder, passed to :meth:`put`)."""
        return self.root / f"{self._name(key)}{suffix}"

    def lock_path(self, key: dict) -> Path:
        """The lock file of the entry for ``key`` (:meth:`lock`)."""
        return LOCKS / f"{digest(str(self.data_path(key).resolve()))}.lock"

    @contextmanager
    def lock(self, *keys: dict) -> Iterator[None]:
        """Hold the locks of the entries for ``keys`` (in name order, so that two holders of overlapping sets
        cannot deadlock), waiting for the process that holds one. Read, compute and put an entry inside it::

            with entries.lock(key):
                hit = entries.get(key)
                if hit is None:
                    entries.put(key, compute())

        Reentrant within a thread."""
        with ExitStack() as held:
            for entry, path in sorted({self.data_path(key): self.lock_path(key) for key in keys}.items()):
                lock = FileLock(path, is_singleton=True)
                try:
                    LOCKS.mkdir(parents=True, exist_ok=True)
                    try:
                        held.enter_context(lock.acquire(timeout=0))
                    except Timeout:
                        log.info("waiting for another process to finish the cache entry %s", entry)
                        held.enter_context(lock.acquire())
                except OSError as err:  # another user's lock folder: computed without a lock, as before
                    log.debug("no lock %s for %s: %s", path, entry, err)
            yield

    def get(self, key: dict, verify: bool = False) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(payload, tensors)`` of the entry for ``key``, or None when it is missing or fails its checks;
        ``verify`` hashes every data file, large ones too (the module's docstring says what a read checks)."""
        from safetensors.torch import load_file

        record_path = self.data_path(key, ".json")
        if not record_path.is_file():
            return None
        try:
            record = _read_record(record_path)
            if record["key"] != _as_json(key):
                raise ValueError("its key differs from the requested one")
            moved = _check_files(self.root, record, verify)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cache entry %s ignored (%s); recomputing", record_path, err)
            return None
        if moved:
            try:
                _write_record(self.root, record_path, {f: record[f] for f in _FIELDS})
            except OSError as err:  # a read-only cache: its large files are hashed again on the next read
                log.debug("could not record the new stamps of %s: %s", record_path, err)
        tensor_path = self.data_path(key, ".safetensors")
        tensors = load_file(str(tensor_path)) if tensor_path.name in record["files"] else {}
        return record["payload"], tensors

    def put(self, key: dict, payload: dict, tensors: dict[str, torch.Tensor] | None = None,
            data: Path | None = None) -> Path:
        """Write the entry for ``key``: its payload and either its ``tensors`` or the ``data`` its owner already
        wrote at :meth:`data_path` (every file of a folder is recorded); returns the record's path."""
        from safetensors.torch import save_file

        if tensors:
            data = self.data_path(key, ".safetensors")
            with atomic_path(data) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        files = {}
        if data is not None:
            paths = sorted(p for p in data.rglob("*") if p.is_file()) if data.is_dir() else [data]
            files = {p.relative_to(self.root).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
                     for p in paths}
        body = _as_json({"key": key, "payload": payload, "files": files})
        return _write_record(self.root, self.data_path(key, ".json"), body)


def _records(root: Path) -> Iterator[Path]:
    """The record files under ``root``: every ``*.json`` but temporaries and the files inside an entry's data
    folder (a folder ``<name>`` beside a ``<name>.json``)."""
    for path in sorted(root.rglob("*.json")):
        inside = path.relative_to(root).parents
        if path.name.startswith(".") or any((root / p).with_name(f"{p.name}.json").is_file()
                                             for p in inside if p.name):
            continue
        yield path


def verify_tree(root: str | Path) -> Iterator[tuple[Path, str | None]]:
    """Every cache entry under ``root`` checked in full (its record's digest, the size and SHA-256 of each of
    its data files): ``(record path, what is wrong, or None)``."""
    for path in _records(Path(root)):
        try:
            _check_files(path.parent, _read_record(path), verify=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            yield path, str(err)
        else:
            yield path, None


def remove_entry(record_path: str | Path) -> None:
    """Delete a cache entry: its record and, when the record can be read, the data files it names."""
    record_path = Path(record_path)
    try:
        names = list(json.loads(record_path.read_text(encoding="utf-8")).get("files", {}))
    except (OSError, ValueError, AttributeError):
        names = []
    record_path.unlink(missing_ok=True)
    root = record_path.parent
    for name in names:
        path = root / name
        if not path.resolve().is_relative_to(root.resolve()):
            continue
        path.unlink(missing_ok=True)
        for folder in path.relative_to(root).parents:  # the emptied folders of a folder entry
            if folder.name and (root / folder).is_dir() and not any((root / folder).iterdir()):
                (root / folder).rmdir()
