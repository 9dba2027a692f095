"""``make bench``: speed targets measured side by side in one run, printed as medians and ratios.

Each ``bench/bench_*.py`` module exposes ``run() -> None`` printing its own section.
``python -m bench scoring rome`` runs only the named sections.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    chosen = argv or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"unknown bench section(s) {unknown}; available: {names}", file=sys.stderr)
        return 2
    for name in chosen:
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"bench.bench_{name}").run()
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
