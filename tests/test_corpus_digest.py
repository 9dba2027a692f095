"""The built-in corpus depends on the Python version alone: pinned digest, and blind to installed packages."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retention.prose import PINNED_DIGESTS, builtin_prose, text_digest


def test_builtin_corpus_matches_the_pinned_digest(tmp_path):
    version = platform.python_version()
    if version not in PINNED_DIGESTS:
        pytest.skip(f"the corpus digest is pinned only for the Python versions the published numbers used "
                    f"({', '.join(PINNED_DIGESTS)}), not {version}: nothing to compare against")
    corpus = builtin_prose(cache=tmp_path / "prose")
    assert text_digest(corpus) == PINNED_DIGESTS[version], (
        "the built-in corpus changed: every number measured on it changes; if the extraction rules changed on "
        "purpose, bump prose._VERSION, re-pin PINNED_DIGESTS and re-measure")


BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from retention.prose import builtin_prose, text_digest
    print(text_digest(builtin_prose(cache=Path(sys.argv[1]))))
""")


def _digest(python, cache) -> str:
    """The corpus digest built by ``python`` with this environment's packages importable (a fresh cache)."""
    out = subprocess.run([str(python), "-c", BUILD, str(cache)], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p), "PATH": "/usr/bin:/bin"})
    return out.stdout.strip()


def test_an_installed_package_leaves_the_corpus_byte_identical(tmp_path):
    """A scratch venv whose own site-packages holds a distribution full of prose (docstrings, METADATA, a
    README) builds the same corpus as this environment: the corpus never reads installed packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    prose = "This module explains at great length how the river flows past the old mill every morning.\n\n"
    (site / "chatty").mkdir(parents=True)
    (site / "chatty" / "__init__.py").write_text(f'"""{prose * 3}"""\n', encoding="utf-8")
    dist = site / "chatty-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: chatty\nVersion: 1.0\n\n{prose}", encoding="utf-8")
    (dist / "README.rst").write_text(prose * 50, encoding="utf-8")
    here = _digest(sys.executable, tmp_path / "cache-a")
    with_package = _digest(python, tmp_path / "cache-b")
    assert len(here) == 64
    assert with_package == here
