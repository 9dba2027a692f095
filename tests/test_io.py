"""Atomic writes, safe names and the verified disk cache behind the study's shared work."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from retention.diskcache import DiskCache
from retention.io import (
    STALE_AFTER_S,
    atomic_path,
    atomic_write_json,
    atomic_write_jsonl,
    finite,
    json_text,
    remove_stale_temporaries,
    safe_name,
)


def _strict(text: str):
    """``json.loads`` that refuses NaN and Infinity (as jq and JavaScript do)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_the_umask_gives_even_from_private_writers(tmp_path, umask):
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        json_file = atomic_write_json(tmp_path / "x.json", {"k": 1})
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors writes its files 0600
        with atomic_path(tmp_path / "folder", folder=True) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))
    finally:
        os.umask(old)
    for path in (json_file, tmp_path / "w.safetensors", tmp_path / "folder" / "w.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~umask


def test_importing_io_leaves_the_umask_alone():
    code = ("import os\n"
            "def refuse(*args): raise AssertionError('os.umask called at import')\n"
            "os.umask = refuse\n"
            "import retention.io, retention.diskcache\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_json_is_strict_non_finite_numbers_are_null(tmp_path):
    row = {"alt_logprob": math.nan, "rates": [math.inf, -math.inf, 0.5], "nested": ({"x": math.nan},), "n": 3}
    expected = {"alt_logprob": None, "rates": [None, None, 0.5], "nested": [{"x": None}], "n": 3}
    assert finite(row) == expected
    assert _strict(atomic_write_json(tmp_path / "a.json", row).read_text()) == expected
    lines = atomic_write_jsonl(tmp_path / "a.jsonl", [row, {"y": 1.0}]).read_text().splitlines()
    assert [_strict(line) for line in lines] == [expected, {"y": 1.0}]
    assert json_text({"b": 1, "a": [1.5, True, None]}, sort_keys=True) == '{"a": [1.5, true, null], "b": 1}'


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
    assert cache.get(key) is None and "does not match its recorded digest" in caplog.text
    cache.put(key, {"layers": [5]}, weights)  # recomputed and written again
    assert cache.get(key)[0] == {"layers": [5]}
    # A well-formed record whose payload was changed fails the record's own digest.
    (record_file,) = tmp_path.glob("*.json")
    record = json.loads(record_file.read_text())
    record["payload"]["layers"] = [6]
    record_file.write_text(json.dumps(record))
    assert cache.get(key) is None and "the record does not match its digest" in caplog.text
    record_file.write_text('{"key": {"model": "abc"}}')  # an older format, or damaged
    assert cache.get(key) is None and "not a whole record" in caplog.text


def test_disk_cache_verifies_data_written_by_its_owner(tmp_path, caplog):
    cache = DiskCache(tmp_path, name=lambda key: f"model-{key['size']}")
    key = {"size": 3}
    folder = cache.data_path(key)
    with atomic_path(folder, folder=True) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    record = json.loads(cache.put(key, {}, data=folder).read_text())
    assert sorted(record["files"]) == ["model-3/a.bin", "model-3/sub/b.txt"]
    assert cache.get(key) == ({}, {})
    (folder / "sub" / "b.txt").unlink()
    assert cache.get(key) is None and "b.txt" in caplog.text


def test_atomic_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "m"
    for content in (b"old", b"new"):
        with atomic_path(target, folder=True) as tmp:
            assert tmp.name.startswith(".m.") and tmp.name.endswith(f".tmp{os.getpid()}")
            (tmp / "w").write_bytes(content)
    assert (target / "w").read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_only_stale_temporaries_are_removed(tmp_path):
    dead = tmp_path / f".x.json.abc.tmp{2**22 + 1}"  # above any pid_max: its writer is gone
    dead.mkdir()
    (dead / "f").write_bytes(b"half")
    live = tmp_path / f".y.json.abc.tmp{os.getpid()}"
    live.write_text("{")
    no_pid = tmp_path / ".z.json.abc.tmp"  # written by an earlier version, owner unknown
    no_pid.write_text("{")
    old = tmp_path / ".w.json.abc.tmp"
    old.write_text("{")
    long_ago = time.time() - STALE_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))
    kept = tmp_path / "entry.json"
    kept.write_text("{}")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, no_pid.name, kept.name])
