"""The package as a user installs it: a wheel built from this tree, installed into a fresh virtual environment,
run from a folder outside the repository (no source checkout, no ``configs/`` beside it, no ``../shared``).

The fresh environment gets the heavy dependencies (torch, transformers, ...) and the default model's wheel from
the project's own environment through a ``.pth`` line naming its site-packages, not by installing them again. A
path line in a ``.pth`` file adds the folder without processing the ``.pth`` files inside it, so the project's
editable install (a finder hook installed by such a file) stays inactive: ``retention`` is the installed wheel.
"""

from __future__ import annotations

import os
import random
import site
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


def _run(args, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv holding only the wheel (installed before the dependencies are made visible, so pip sees no other
    ``retention`` to replace), then the project environment's site-packages on its path."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
          "--no-compile", "-q", wheel], cwd=tmp)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "project_deps.pth").write_text("".join(f"{p}\n" for p in deps), encoding="utf-8")
    return venv


CHECKS = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import retention
    from retention import corpus
    from retention.editing.base import PRESETS, preset_names
    from retention.editing.registry import build_editor

    venv = Path(sys.argv[1])
    assert Path(retention.__file__).resolve().is_relative_to(venv.resolve()), retention.__file__
    assert {"smollm2-135m", "tiny-llama"} <= set(preset_names("rome")), preset_names("rome")
    assert set(preset_names("memit")) >= {"smollm2-135m", "gpt2-xl"}
    try:
        build_editor("rome", model_name="org/nope")
    except FileNotFoundError as err:
        assert "no preset 'nope'" in str(err) and "available: gpt-j-6b, gpt2-xl" in str(err), err
    else:
        raise AssertionError("an unknown preset was accepted")
    # no checkout around the installed package: wikitext2 needs RETENTION_DATA
    os.environ.pop("RETENTION_DATA", None)
    try:
        corpus.corpus_text("wikitext2")
    except FileNotFoundError as err:
        assert "set RETENTION_DATA" in str(err), err
    else:
        raise AssertionError("wikitext2 found without RETENTION_DATA")
    try:  # the ROME preset's corpus is checked when its hyperparameters are made, before any model is loaded
        build_editor("rome", model_name="smollm2-135m")
    except ValueError as err:
        assert "mom2_corpus" in str(err) and "export RETENTION_DATA=" in str(err), err
    else:
        raise AssertionError("the SmolLM2 ROME preset's wikitext2 resolved without RETENTION_DATA")
    os.environ["RETENTION_DATA"] = sys.argv[2]
    assert "the shared split" in corpus.corpus_text("wikitext2")[0]
    assert build_editor("rome", model_name="smollm2-135m").hparams.mom2_corpus == "wikitext2"
    assert corpus.corpus_text("$RETENTION_DATA/wikitext/wiki.test.raw")[0] == corpus.corpus_text("wikitext2")[0]
    print("checks ok", retention.__file__)
""")


@pytest.mark.slow
def test_the_installed_wheel_edits_with_its_shipped_preset_outside_the_repository(tmp_path, project_wheel):
    t0 = time.perf_counter()
    venv = _fresh_venv(tmp_path, project_wheel)
    t_install = time.perf_counter() - t0

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = tmp_path / "data"
    (data / "wikitext").mkdir(parents=True)
    rng = random.Random(0)
    words = "the shared split of a river city music war king film of and in was".split()
    (data / "wikitext" / "wiki.test.raw").write_text(
        "\n\n".join(" = Title = \n" + " ".join(rng.choice(words) for _ in range(60)) for _ in range(400)),
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RETENTION_DATA", "PYTHONPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    (outside / "checks.py").write_text(CHECKS, encoding="utf-8")
    assert "checks ok" in _run([venv / "bin" / "python", "checks.py", venv, data], cwd=outside, env=env)

    # The wheel's console script with the shipped tiny-llama ROME preset, its key statistics over `wikitext2`
    # found through RETENTION_DATA (the preset's own `builtin` corpus would do too: it needs only the stdlib).
    out = outside / "edit"
    log = _run([venv / "bin" / "retention", "edit", "--model", "tiny-llama", "--editor", "rome", "--n", "2",
                "--select_known", "none", "--set", "{mom2_corpus: wikitext2}", "--out", out], cwd=outside,
               env={**env, "RETENTION_DATA": str(data)})
    assert "rome (sequential), 2 edits of tiny-llama" in log, log
    assert (out / "scores.json").is_file() and (out / "edit").is_dir()
    print(f"wheel installed in {t_install:.1f} s, all in {time.perf_counter() - t0:.1f} s")
