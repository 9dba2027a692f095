"""Disk-cache reads stay cheap for large files (their size and stamp, no hashing) and a full check finds what
a read cannot: ``get(verify=True)`` and ``retention cache verify``."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from retention import cli, diskcache
from retention.diskcache import DiskCache, verify_tree

KEY = {"model": "abc"}


@pytest.fixture
def large(tmp_path, monkeypatch):
    """A cache whose tensor file counts as large (LARGE_FILE lowered to 64 bytes), and a count of the files hashed."""
    monkeypatch.setattr(diskcache, "LARGE_FILE", 64)
    hashed = []
    real = diskcache.file_digest
    monkeypatch.setattr(diskcache, "file_digest", lambda path, fresh=False: hashed.append(path) or real(path, fresh))
    cache = DiskCache(tmp_path / "covariance")
    cache.put(KEY, {"layers": [1]}, {"c": torch.arange(64.0)})
    hashed.clear()
    return cache, hashed


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _stamps_as_now(cache: DiskCache) -> None:
    """Record the current stamps of the entry's files: the file changed while its stamp stayed (bit rot)."""
    record_path = cache.data_path(KEY, ".json")
    record = json.loads(record_path.read_text())
    record["stamps"] = {name: diskcache._stamp((cache.root / name).stat()) for name in record["files"]}
    record_path.write_text(json.dumps(record))


def test_a_read_hashes_no_large_file_while_its_stamp_holds(large):
    cache, hashed = large
    payload, tensors = cache.get(KEY)
    assert payload == {"layers": [1]} and torch.equal(tensors["c"], torch.arange(64.0)) and hashed == []
    assert cache.get(KEY, verify=True) is not None and len(hashed) == 1


def test_a_rewritten_large_file_is_hashed_and_refused(large, caplog):
    cache, hashed = large
    tensor_file = cache.data_path(KEY, ".safetensors")
    _flip_last_byte(tensor_file)  # same size, new stamp
    assert cache.get(KEY) is None and len(hashed) == 1
    assert f"{tensor_file.name} does not match its recorded digest" in caplog.text


def test_a_copied_cache_is_hashed_once_then_trusted(large, tmp_path):
    cache, hashed = large
    shutil.copytree(cache.root, tmp_path / "copy")  # new inodes and times, the same bytes
    copy = DiskCache(tmp_path / "copy")
    assert copy.get(KEY) is not None and len(hashed) == 1
    assert copy.get(KEY) is not None and len(hashed) == 1  # its new stamp was recorded


def test_damage_that_keeps_the_stamp_is_found_by_a_full_check(large, tmp_path, caplog):
    cache, _ = large
    _flip_last_byte(cache.data_path(KEY, ".safetensors"))
    _stamps_as_now(cache)
    assert cache.get(KEY) is not None  # the cheap read cannot see it
    assert cache.get(KEY, verify=True) is None and "does not match its recorded digest" in caplog.text
    assert [(p.name, problem) for p, problem in verify_tree(tmp_path)] == [
        (cache.data_path(KEY, ".json").name, f"{cache.data_path(KEY, '.safetensors').name} does not match its "
                                             "recorded digest")]


def test_a_small_file_is_always_hashed(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    cache.put(KEY, {}, {"c": torch.arange(4.0)})
    _flip_last_byte(cache.data_path(KEY, ".safetensors"))
    _stamps_as_now(cache)
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY) is None
    assert "does not match its recorded digest" in caplog.text


def test_records_of_older_versions_are_read(tmp_path):
    """A record written before stamps existed is valid; its large files are hashed until it is restamped."""
    cache = DiskCache(tmp_path)
    record_path = cache.put(KEY, {"x": 1}, {"c": torch.arange(4.0)})
    record = json.loads(record_path.read_text())
    del record["stamps"]
    record_path.write_text(json.dumps(record))
    assert cache.get(KEY)[0] == {"x": 1}


@pytest.fixture
def cache_command():
    assert "cache" in cli.COMMANDS  # reachable from the console script
    return lambda *argv: cli.main(["cache", *argv])


def test_cache_verify_lists_corrupt_entries_and_removes_them(tmp_path, cache_command, capsys):
    root = tmp_path / "cache"
    good = DiskCache(root / "selection")
    good.put({"n": 1}, {"ids": [1, 2]})
    models = DiskCache(root / "models", name=lambda key: f"m-{key['size']}")
    folder = models.data_path({"size": 3})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a data file of the entry, not a record
    models.put({"size": 3}, {}, data=folder)
    bad = DiskCache(root / "covariance" / "fingerprint")
    bad.put(KEY, {}, {"c": torch.arange(4.0)})
    assert cache_command("verify", "--folder", str(root)) == 0
    assert "3 entries checked, 0 corrupt" in capsys.readouterr().out

    _flip_last_byte(bad.data_path(KEY, ".safetensors"))
    (root / "selection" / "torn.json").write_text('{"key": ')
    assert cache_command("verify", "--folder", str(root)) == 1
    out = capsys.readouterr().out
    assert f"corrupt: {bad.data_path(KEY, '.json')}: " in out and "does not match its recorded digest" in out
    assert f"corrupt: {root / 'selection' / 'torn.json'}: " in out and "4 entries checked, 2 corrupt" in out

    assert cache_command("verify", "--folder", str(root), "--remove", "true") == 1
    assert sorted(p.name for p in (root / "covariance" / "fingerprint").iterdir()) == []
    assert not (root / "selection" / "torn.json").exists()
    assert cache_command("verify", "--folder", str(root)) == 0
    assert "2 entries checked, 0 corrupt" in capsys.readouterr().out
    assert cache_command("verify", "--folder", str(tmp_path / "absent")) == 2
