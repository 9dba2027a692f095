"""Disk-cache reads: one 1 GiB entry (a float32 tensor, the size of a few layers' key covariances of an 8B
model) read with the default checks (sizes, and the stamp of each large file) against a full check
(``verify=True``: SHA-256 of every byte, what every read did before in each process). Median wall seconds of 3
reads each, interleaved, after a warm-up read: the file is in the page cache, so the hashing is what differs,
not the disk. The process's memo of file digests is cleared before each read, as in a fresh run.
"""

from __future__ import annotations

import tempfile

import torch

from bench.common import interleaved_medians
from retention import diskcache
from retention.diskcache import DiskCache

GIB = 1 << 30
REPEATS = 3


def _read(cache: DiskCache, key: dict, verify: bool) -> None:
    diskcache._large_digests.clear()
    assert cache.get(key, verify=verify) is not None


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        cache = DiskCache(folder)
        key = {"entry": "1 GiB"}
        cache.put(key, {}, {"values": torch.ones(GIB // 4, dtype=torch.float32)})
        times = interleaved_medians({"default": lambda: _read(cache, key, False),
                                     "verify": lambda: _read(cache, key, True)}, REPEATS)
    print(f"1 GiB entry, median of {REPEATS}: get() {times['default']:.3f} s, get(verify=True) "
          f"{times['verify']:.3f} s ({times['verify'] / times['default']:.0f}x)")
