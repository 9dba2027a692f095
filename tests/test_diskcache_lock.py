"""DiskCache.lock: processes that need the same entry at once compute it once; a killed holder frees it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch
from filelock import FileLock, Timeout

from retention.diskcache import DiskCache, verify_tree

KEY = {"kind": "test", "n": 3}


def _get_or_compute(root: str, calls: str, barrier) -> None:
    """Both workers start together; the one that computes records its pid in ``calls`` and takes its time."""
    cache = DiskCache(root)
    barrier.wait()
    with cache.lock(KEY):
        if cache.get(KEY) is None:
            with open(calls, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(1.0)  # the other worker is waiting on the lock meanwhile
            cache.put(KEY, {"by": os.getpid()}, {"t": torch.arange(4.0)})
    payload, tensors = cache.get(KEY)
    assert torch.equal(tensors["t"], torch.arange(4.0)), tensors


def _hold_until_killed(root: str, held) -> None:
    with DiskCache(root).lock(KEY):
        held.set()
        time.sleep(600)


def test_two_processes_compute_an_entry_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    calls = tmp_path / "calls.txt"
    workers = [ctx.Process(target=_get_or_compute, args=(str(tmp_path / "c"), str(calls), barrier))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(calls.read_text().split()) == 1  # one computed, the other waited and read it
    # The lock file is kept out of the cache: the folder holds the entry only, and it is sound.
    cache = DiskCache(tmp_path / "c")
    assert cache.lock_path(KEY).is_file()
    assert sorted(cache.root.iterdir()) == [cache.data_path(KEY, suffix) for suffix in (".json", ".safetensors")]
    assert [(p, problem) for p, problem in verify_tree(cache.root)] == [(cache.data_path(KEY, ".json"), None)]


def test_a_killed_holder_leaves_no_lock_held(tmp_path):
    root = tmp_path / "c"
    ctx = mp.get_context("spawn")
    held = ctx.Event()
    child = ctx.Process(target=_hold_until_killed, args=(str(root), held))
    child.start()
    try:
        assert held.wait(60)
        with pytest.raises(Timeout):
            FileLock(DiskCache(root).lock_path(KEY)).acquire(timeout=0)  # the child holds it
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    cache = DiskCache(root)
    done = threading.Event()

    def compute():
        with cache.lock(KEY):
            cache.put(KEY, {"after": "kill"})
        done.set()

    threading.Thread(target=compute, daemon=True).start()
    assert done.wait(10), "the lock of a killed process is still held"
    assert cache.get(KEY)[0] == {"after": "kill"}


def test_locks_are_reentrant_across_instances(tmp_path):
    cache, other = DiskCache(tmp_path), DiskCache(tmp_path)
    a, b = {"n": 1}, {"n": 2}
    with cache.lock(b, a), other.lock(a):  # the same entry again in this thread, through another instance
        cache.put(a, {"x": 1})
    assert cache.get(a)[0] == {"x": 1}
