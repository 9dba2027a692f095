"""The GPU check (bench/gpu_check.sh) on the CPU: its models, its table (a row per step, a forced failure, the
time budget) and its offline install from a wheel folder over an environment that already has torch."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.gpu_check import LARGE, MAIN, SHAPES

ROOT = Path(__file__).resolve().parents[1]
MISSING = ("jsonargparse", "docstring_parser", "typeshed_client", "gguf", "wandb")
"""What the test's host lacks: the project's dependencies an offline GPU host typically has not installed."""
TINY_MAIN = "295,392"
"""Parameters of ``--device cpu``'s SmolLM2: 2 layers of width 96, 3 query and 1 key/value head of 32."""


def _check(tmp: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--out", str(tmp), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    table = tmp / "table.json"
    assert table.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(table.read_text())


def test_the_random_models_have_the_published_shapes():
    for shape, parameters in ((MAIN, 134_515_008), (LARGE, 1_235_814_400)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]))
        assert sum(p.numel() for p in model.parameters()) == parameters, shape


def test_every_step_is_a_row_and_a_failure_does_not_stop_the_others(tmp_path):
    proc, table = _check(tmp_path, "--steps", "model", "edit-memit", "fit-fsdp1", "covariance",
                         "--fail", "edit-memit", "--budget", "600")
    assert proc.returncode == 1
    rows = {r["step"]: r for r in table["rows"]}
    assert list(rows) == ["model", "edit-memit", "fit-fsdp1", "covariance"]
    assert rows["model"]["status"] == "ok"
    assert rows["model"]["results"]["smollm2-135m parameters"] == TINY_MAIN
    assert rows["edit-memit"]["status"] == "failed" and "--no_such_option" in rows["edit-memit"]["error"]
    assert rows["fit-fsdp1"]["status"] == "skipped" and "GPUs only" in rows["fit-fsdp1"]["error"]
    assert rows["covariance"]["status"] == "ok" and rows["covariance"]["results"]["tokens/s"] > 0
    markdown = (tmp_path / "table.md").read_text()
    assert "| edit-memit | retention edit: MEMIT, a batch of 4 | failed |" in markdown
    assert (tmp_path / "logs" / "edit-memit.log").is_file()
    assert (tmp_path / "models" / MAIN / "tokenizer.json").is_file()


def test_the_budget_stops_the_running_step_and_skips_the_rest(tmp_path):
    proc, table = _check(tmp_path, "--steps", "model", "covariance", "--budget", "5")
    assert proc.returncode == 1
    model, covariance = table["rows"]
    assert model["status"] == "failed" and model["error"].startswith("stopped at the time budget")
    assert covariance["status"] == "skipped" and "budget ran out" in covariance["error"]
    assert table["total_s"] < 5


# -- the offline install -------------------------------------------------------------------------------------


def _wheel_of_installed(name: str, folder: Path) -> Path:
    """A wheel of an installed distribution, of the files its RECORD lists: as the wheel folder holds it."""
    dist = distribution(name)
    tag = next(line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines()
               if line.startswith("Tag:"))
    files = [f for f in dist.files if not str(f).startswith("..") and f.suffix != ".pyc"
             and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]
    info = next(str(f.parent) for f in dist.files if str(f.parent).endswith(".dist-info"))
    path = folder / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for f in files:
            data = Path(dist.locate_file(f)).read_bytes()
            wheel.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f},sha256={digest},{len(data)}")
        wheel.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


def _host(tmp: Path) -> Path:
    """The host's packages: this environment's site-packages less ``MISSING``, pip and the editable project,
    as links in one folder (given to the host's Python on PYTHONPATH)."""
    site = Path(torch.__file__).parents[1]
    hidden = {str(f).split("/")[0] for name in MISSING for f in distribution(name).files}
    host = tmp / "host"
    host.mkdir()
    for entry in site.iterdir():
        if entry.name in hidden or re.match(r"pip\b|retention\b|__editable__|.*\.pth$", entry.name):
            continue
        (host / entry.name).symlink_to(entry)
    return host


def test_the_wheel_folder_installs_only_what_the_host_lacks_and_edits_offline(tmp_path, project_wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy2(project_wheel, wheels)
    for name in MISSING:
        _wheel_of_installed(name, wheels)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))},
           "PYTHONPATH": str(_host(tmp_path)), "PYTHON": sys.executable, "PYTHONNOUSERSITE": "1"}
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--wheels", wheels, "--out", out, "--install-only"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = re.search(r"Successfully installed (.*)", proc.stdout).group(1).split()
    names = {re.sub(r"-[^-]+$", "", n).replace("-", "_") for n in installed}
    assert names == {*MISSING, "retention"}, installed
    python = out / "venv" / "bin" / "python"
    code = "import torch, retention; print(torch.__file__, retention.__file__)"
    where = subprocess.run([python, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()
    assert where[0].startswith(env["PYTHONPATH"]) and where[1].startswith(str(out / "venv"))

    edit = subprocess.run([out / "venv" / "bin" / "retention", "edit", "--model", "tiny-llama", "--n", "2",
                           "--select_known", "none", "--save_model", "false", "--out", tmp_path / "edit"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert edit.returncode == 0, edit.stdout + edit.stderr
    assert "rome (sequential), 2 edits of tiny-llama" in edit.stdout
