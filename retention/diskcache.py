"""Verified disk-cache entries: a JSON record (its key, its payload and the digest of its tensors) beside an
optional safetensors file, under ``cache_dir()/<kind>/<key digest>``.

An entry is written tensors first, record last, each atomically, so a reader sees a whole entry or none; two
processes writing the same entry write the same bytes. On read the key must match and the tensors must hash to
the recorded digest; anything else is logged, the entry is ignored (the caller recomputes and overwrites it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from retention.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskCache:
    """Entries of one kind (``selection``, ``edits``...) under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: dict) -> tuple[Path, Path]:
        name = digest(key)
        return self.root / f"{name}.json", self.root / f"{name}.safetensors"

    def get(self, key: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """``(payload, tensors)`` of the entry for ``key``, or None when it is missing or fails its checks."""
        from safetensors.torch import load_file

        record_path, tensor_path = self._paths(key)
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("key") != json.loads(json.dumps(key, default=str)):
                raise ValueError("its key differs from the requested one")
            tensors: dict[str, torch.Tensor] = {}
            if record.get("tensors_digest") is not None:
                if file_digest(tensor_path) != record["tensors_digest"]:
                    raise ValueError(f"{tensor_path.name} does not match the recorded digest")
                tensors = load_file(str(tensor_path))
            return record["payload"], tensors
        except (OSError, ValueError, KeyError) as err:
            log.warning("cache entry %s ignored (%s); recomputing", record_path, err)
            return None

    def put(self, key: dict, payload: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the entry for ``key``; returns the record's path."""
        from safetensors.torch import save_file

        record_path, tensor_path = self._paths(key)
        tensors_digest = None
        if tensors:
            with atomic_path(tensor_path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            tensors_digest = file_digest(tensor_path)
        return atomic_write_json(record_path, {"key": key, "payload": payload, "tensors_digest": tensors_digest})
