"""Atomic writes, safe names and the verified disk cache behind the study's shared work."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from retention.diskcache import DiskCache
from retention.io import atomic_path, atomic_write_json, safe_name


def test_atomic_writes_leave_no_temporary_and_normal_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert path.read_text().strip().startswith("{") and [p.name for p in path.parent.iterdir()] == ["x.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a" / "y.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


@pytest.mark.parametrize("text, expected", [
    ("case-7", "case-7"), ("../../x", ".._.._x"), ("/abs/path", "_abs_path"), ("..", "_.."), ("", "_"),
    ("a b\\c", "a_b_c"),
])
def test_safe_name_is_one_component(text, expected):
    assert safe_name(text) == expected


def test_disk_cache_round_trip_and_rejects_tampered_entries(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    key = {"model": "abc", "facts": [1, 2]}
    assert cache.get(key) is None
    weights = {"layer.weight": torch.arange(6.0).view(2, 3)}
    cache.put(key, {"layers": [5]}, weights)
    payload, tensors = cache.get(key)
    assert payload == {"layers": [5]} and torch.equal(tensors["layer.weight"], weights["layer.weight"])
    assert cache.get({"model": "abc", "facts": [1, 3]}) is None
    # Overwrite some bytes of the tensor file (header intact): the digest check refuses the entry.
    (tensor_file,) = tmp_path.glob("*.safetensors")
    data = bytearray(tensor_file.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    tensor_file.write_bytes(bytes(data))
    assert cache.get(key) is None and "does not match the recorded digest" in caplog.text
    cache.put(key, {"layers": [5]}, weights)  # recomputed and written again
    assert cache.get(key)[0] == {"layers": [5]}
