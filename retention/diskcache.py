"""Verified disk-cache entries, one mechanism for every cache under ``cache_dir()``.

An entry of a kind (``selection``, ``covariance``, ``models``...) is a JSON record ``<name>.json`` holding its key,
its payload, the size and SHA-256 of each of its data files and a digest of all of that, beside its data: tensors
in ``<name>.safetensors``, or a file or folder its owner writes at :meth:`DiskCache.data_path`.

Data is written first, the record last, each atomically, so a reader sees a whole entry or none; two processes
writing the same entry write the same bytes. On read the record must match its digest, its key the requested
one and every data file its recorded size and digest; anything else is logged with what was wrong and the entry is
ignored (the caller recomputes and overwrites it). Opening a kind's folder removes the temporaries that
interrupted writes left there (:func:`retention.io.remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from retention.io import atomic_path, atomic_write_json, remove_stale_temporaries

log = logging.getLogger(__name__)

_FIELDS = ("key", "payload", "files")
_MEMO_BYTES = 64 << 20
_large_digests: dict[tuple, str] = {}
"""(path, size, mtime, inode) -> SHA-256 of the files of at least ``_MEMO_BYTES`` hashed by this process."""


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _large_digests:
        return _large_digests[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if st.st_size >= _MEMO_BYTES:
        # A converted model is read several times per process (tokenizer, weights): it is hashed once. Any rewrite
        # of a file this large changes its mtime or inode (small files are always hashed: a rewrite within one
        # clock tick may keep the mtime).
        _large_digests[memo] = h.hexdigest()
    return h.hexdigest()


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from its JSON record."""
    return json.loads(json.dumps(obj, ensure_ascii=False, default=str))


class DiskCache:
    """Entries of one kind under ``root``, named ``name(key)`` (by default a digest of the key)."""

    def __init__(self, root: str | Path, name: Callable[[dict], str] = digest):
        self.root = Path(root)
        self._name = name
        remove_stale_temporaries(self.root)

    def data_path(self, key: dict, suffix: str = "") -> Path:
        """Where the entry for ``key`` keeps data its owner writes (a file or a folder, passed to :meth:`put`)."""
        return self.root / f"{self._name(key)}{suffix}"

    def _check(self, record: Any, key: dict) -> None:
        if not isinstance(record, dict) or any(f not in record for f in (*_FIELDS, "digest")):
            raise ValueError("not a whole record (an older format, or damaged)")
        if record["digest"] != digest({f: record[f] for f in _FIELDS}):
            raise ValueError("the record does not match its digest")
        if record["key"] != _as_json(key):
            raise ValueError("its key differs from the requested one")
        for name, expected in record["files"].items():
            size = (self.root / name).stat().st_size
            if size != expected["size"]:
                raise ValueError(f"{name} has {size} bytes where {expected['size']} were written")
            if file_digest(self.root / name) != expected["sha256"]:
                raise ValueError(f"{name} does not match its recorded digest")

    def get(self, key: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(payload, tensors)`` of the entry for ``key``, or None when it is missing or fails its checks."""
        from safetensors.torch import load_file

        record_path = self.data_path(key, ".json")
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            self._check(record, key)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cache entry %s ignored (%s); recomputing", record_path, err)
            return None
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
        return atomic_write_json(self.data_path(key, ".json"), {**body, "digest": digest(body)})
