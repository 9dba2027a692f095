"""Shared fixtures: tiny random models (fast unit tests) and the real default model (slow tests)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} absent (the shared real datasets)")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama():
    from retention.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from retention.models import load_model

    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def real_model():
    """The default SmolLM2-135M-Instruct (converted once, then cached)."""
    from retention.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory, tiny_llama):
    """The tiny pipeline run on 1 rank (tests/tiny_runs.py), once per session, for the tests that run it
    otherwise and compare: (config, run folder)."""
    from tiny_runs import run_one_rank

    return run_one_rank(tmp_path_factory.mktemp("pipeline"), tiny_llama[1])


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree, built once from a copy (a build writes ``build/`` and ``*.egg-info`` by the
    sources). With setuptools at hand (the dev extra), no isolated build environment: nothing to download."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "retention", src / "retention", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation", "--no-index"]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", tmp / "dist",
                           src], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("retention-*.whl")
    return wheel
