"""Helpers live on the floor of what they are about (docs/design.md, import layering): the FSDP helpers with the
other collectives in ``retention.distributed``, the cache path on the ground floor in ``retention.paths``."""

from __future__ import annotations

import subprocess
import sys


def test_the_fsdp_helpers_live_in_distributed():
    from retention import distributed, scoring

    assert distributed.is_sharded.__module__ == distributed.gathered_root.__module__ == "retention.distributed"
    assert not hasattr(scoring, "gathered_root")


def test_the_prose_corpus_finds_its_cache_without_loading_the_model_loader():
    """``retention.prose`` used to import ``cache_dir`` from ``retention.models`` (transformers' loaders, GGUF
    conversion); the path now comes from ``retention.paths``, which imports nothing of the project."""
    code = ("import sys, retention.prose, retention.paths; "
            "assert 'retention.models' not in sys.modules, 'retention.models was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
