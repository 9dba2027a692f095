"""A study file and its expansion into runs: a base ``fit`` config, a grid of axes, named arms and seeds.

A study file (YAML; see ``docs/studies.md``)::

    name: paper_smollm2_cpu          # default: the file's stem
    base: ../demo.yaml               # fit config(s), relative to this file, or an inline mapping
    set: {trainer.max_steps: 60}     # dotted fit keys applied to every run
    grid:                            # axes: a dotted key and its values, or a name and a list of key mappings
      editor:
        - {edits.editor: rome, edits.mode: sequential}
        - {edits.editor: alphaedit, edits.mode: batch}
    arms:                            # named override sets, each run in every grid cell
      baseline: {}
      freeze_edited: {freeze.policy: edited}
    baseline: baseline               # the arm every other arm is compared with
    seeds: [0, 1, 2]                 # written to every key of seed_keys
    protocol: runs                   # or single: each of the n_edit facts edited alone, one run per fact

Runs are the product grid cells x arms x seeds (x facts under ``single``); later sources override earlier ones:
``set``, then the grid cell, then the arm, then the seed, then the fact.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Protocol = Literal["runs", "single"]
SEED_KEYS = ("seed_everything", "edits.seed", "paraphrases.seed")
"""Where a study's seed goes by default: training, selection and split, augmentation."""


def cell_label(cell: Sequence[tuple[str, str]]) -> str:
    """``editor=rome-sequential, model.adapter.method=lora``; ``all`` for a study without a grid."""
    return ", ".join(f"{axis}={label}" for axis, label in cell) or "all"


class StudyError(ValueError):
    """A study file that cannot be expanded; names the file and the field."""


@dataclass(frozen=True)
class StudyRun:
    """One ``retention fit`` run of a study."""

    name: str
    cell: tuple[tuple[str, str], ...]
    """The grid cell: (axis, value label) pairs."""
    arm: str
    seed: int
    fact: int | None
    overrides: dict[str, Any]
    """Dotted fit keys -> values, in the order they apply."""

    @property
    def cell_label(self) -> str:
        return cell_label(self.cell)

    @property
    def tags(self) -> list[str]:
        return [f"arm={self.arm}", *(f"{a}={v}" for a, v in self.cell), f"seed={self.seed}"]


@dataclass
class StudySpec:
    """A parsed study file."""

    name: str
    base: list[Path] | dict[str, Any]
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    """Axis -> [(value label, overrides)]."""
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"baseline": {}})
    baseline: str = "baseline"
    seeds: list[int] = field(default_factory=lambda: [0])
    seed_keys: list[str] = field(default_factory=lambda: list(SEED_KEYS))
    protocol: Protocol = "runs"
    out_dir: str = "runs/studies"
    source: str = "<inline>"

    @classmethod
    def from_file(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StudyError(f"study file {path} does not exist") from None
        except (yaml.YAMLError, RecursionError, ValueError) as err:  # ValueError: bad UTF-8, a too-long integer
            raise StudyError(f"study file {path}: not valid YAML: {err}") from None
        return cls.from_dict(data, source=str(path), root=path.parent, default_name=path.stem)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<inline>", root: Path | None = None,
                  default_name: str = "study") -> StudySpec:
        def fail(key: str, message: str) -> StudyError:
            return StudyError(f"study file {source}: field '{key}': {message}")

        if not isinstance(data, dict):
            raise StudyError(f"study file {source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {"name", "base", "set", "grid", "arms", "baseline", "seeds", "seed_keys", "protocol", "out_dir"}
        for key in data:
            if key not in known:
                raise fail(key, f"unknown field; the fields are {', '.join(sorted(known))}")
        name = str(data.get("name") or default_name)
        if not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            raise fail("name", f"{name!r} must be a plain folder name (letters, digits, '_', '-', '.')")
        base = data.get("base")
        if isinstance(base, list) and not all(isinstance(p, str) for p in base):
            raise fail("base", "a list of base configs holds file names only")
        if isinstance(base, (str, list)):
            paths = [Path(p) for p in ([base] if isinstance(base, str) else base)]
            paths = [p if p.is_absolute() or root is None else root / p for p in paths]
            for p in paths:
                if not p.is_file():
                    raise fail("base", f"config file {p} does not exist")
            base = paths
        elif not isinstance(base, dict):
            raise fail("base", "give a fit config file (relative to the study file), a list of them or a mapping")
        overrides = data.get("set") or {}
        if not isinstance(overrides, dict):
            raise fail("set", "expected a mapping of dotted fit keys to values")
        if not isinstance(data.get("grid") or {}, dict):
            raise fail("grid", "expected a mapping of dotted fit keys to lists of values")
        grid = {}
        for axis, values in (data.get("grid") or {}).items():
            if not isinstance(values, list) or not values:
                raise fail(f"grid.{axis}", "expected a non-empty list of values")
            items = []
            for v in values:
                if isinstance(v, dict):
                    items.append(("-".join(_label(x) for x in v.values()), dict(v)))
                else:
                    items.append((_label(v), {axis: v}))
            labels = [label for label, _ in items]
            if len(set(labels)) != len(labels):
                raise fail(f"grid.{axis}", f"values must have distinct labels, got {labels}")
            grid[str(axis)] = items
        arms = data.get("arms") or {"baseline": {}}
        if not isinstance(arms, dict) or not all(isinstance(v, dict) or v is None for v in arms.values()):
            raise fail("arms", "expected a mapping of arm name -> mapping of dotted fit keys")
        arms = {str(k): dict(v or {}) for k, v in arms.items()}
        for arm in arms:
            if not re.fullmatch(r"[\w.-]+", arm):
                raise fail(f"arms.{arm}", "arm names are plain words (letters, digits, '_', '-', '.')")
        baseline = str(data.get("baseline", next(iter(arms))))
        if baseline not in arms:
            raise fail("baseline", f"{baseline!r} is not an arm ({', '.join(arms)})")
        seeds = data.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise fail("seeds", "expected a non-empty list of integers")
        if len(set(seeds)) != len(seeds):
            raise fail("seeds", f"repeated seeds in {seeds}")
        seed_keys = data.get("seed_keys", SEED_KEYS)
        if not isinstance(seed_keys, (list, tuple)) or not all(isinstance(k, str) for k in seed_keys):
            raise fail("seed_keys", "expected a list of dotted fit keys")
        protocol = data.get("protocol", "runs")
        if protocol not in ("runs", "single"):
            raise fail("protocol", f"{protocol!r}: choose runs or single")
        return cls(name, base, dict(overrides), grid, arms, baseline, list(seeds),
                   list(seed_keys), protocol, str(data.get("out_dir", "runs/studies")),
                   source)

    def as_study_file(self) -> dict[str, Any]:
        """The study as a study file gives it, with the fit config paths absolute: ``from_dict`` of it expands to
        the same runs from any folder (``retention study --print_config``)."""
        grid = {axis: [o[axis] if list(o) == [axis] and not isinstance(o[axis], dict) else o for _, o in items]
                for axis, items in self.grid.items()}
        base = [str(p.resolve()) for p in self.base] if isinstance(self.base, list) else self.base
        return {"name": self.name, "base": base, "set": self.set, "grid": grid, "arms": self.arms,
                "baseline": self.baseline, "seeds": self.seeds, "seed_keys": self.seed_keys,
                "protocol": self.protocol, "out_dir": self.out_dir}

    def folder(self, out_dir: str | None = None) -> Path:
        return Path(out_dir or self.out_dir) / self.name

    def expand(self, n_edit: int | None = None) -> list[StudyRun]:
        """Every run of the study. Under ``protocol: single`` ``n_edit`` (the number of facts) is needed."""
        if self.protocol == "single" and not n_edit:
            raise StudyError(f"study file {self.source}: protocol single needs edits.n_edit > 0")
        runs = []
        cells = list(itertools.product(*[[(axis, label, o) for label, o in items]
                                         for axis, items in self.grid.items()]))
        for cell in cells:
            for arm, arm_overrides in self.arms.items():
                for seed in self.seeds:
                    facts: list[int | None] = list(range(n_edit)) if self.protocol == "single" else [None]
                    for fact in facts:
                        overrides = dict(self.set)
                        for _, _, o in cell:
                            overrides.update(o)
                        overrides.update(arm_overrides)
                        overrides.update({key: seed for key in self.seed_keys})
                        parts = [*(f"{axis}={label}" for axis, label, _ in cell), arm, f"seed{seed}"]
                        if fact is not None:
                            overrides.update({"edits.mode": "single", "edits.single_index": fact})
                            parts.append(f"fact{fact:03d}")
                        name = re.sub(r"[^\w.=-]+", "_", "__".join(parts))
                        runs.append(StudyRun(name, tuple((a, lbl) for a, lbl, _ in cell), arm, seed, fact,
                                             overrides))
        first: dict[str, StudyRun] = {}
        for run in runs:
            other = first.setdefault(run.name, run)
            if other is not run:
                raise StudyError(f"study file {self.source}: field 'grid': cells ({other.cell_label}) and "
                                 f"({run.cell_label}) both give the run folder {run.name!r} (characters "
                                 "other than letters, digits and '_ . = -' become '_'): make the values "
                                 "differ in letters or digits")
        return runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "base": [str(p) for p in self.base] if isinstance(self.base, list) else self.base,
            "set": self.set, "grid": {a: [{"label": lbl, "set": o} for lbl, o in v] for a, v in self.grid.items()},
            "arms": self.arms, "baseline": self.baseline, "seeds": self.seeds, "seed_keys": self.seed_keys,
            "protocol": self.protocol, "source": self.source,
        }


def _label(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return re.sub(r"[^\w.-]+", "_", yaml.safe_dump(value, default_flow_style=True).strip())
    return str(value)
