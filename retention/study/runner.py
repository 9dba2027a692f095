"""Running a study: resolve every run's config, skip finished runs, resume interrupted ones, run the rest.

The study folder ``<out_dir>/<name>/`` holds ``study.json`` (the spec, every run's overrides, config digest and
state; rewritten atomically after every change), ``configs/`` (the override file of each run), ``logs/`` (each
subprocess's output under ``--jobs``), ``runs/<run>/`` (what ``retention fit`` writes) and ``report/``.

A run is finished when its folder holds ``study_run.json``, written atomically after ``retention fit`` returned
with a ``summary.json``; it records the digest of the run's resolved config and the SHA-256 of the data files
it names. A run killed half-way resumes from its ``checkpoints/last.ckpt`` (``--ckpt_path last``, to the same
results as an uninterrupted run); one killed before its first checkpoint is deleted and run again from
nothing.
A finished run whose config or data has since changed (the study file, a file it includes or a data file was
edited) is reported and the study stops, unless ``redo_changed`` discards it. A study holds its folder's lock
while it runs: a second process on the same study stops with a message.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from retention.callbacks.checkpoint import config_files, flatten
from retention.diskcache import digest
from retention.io import FolderLocked, atomic_write_json, atomic_write_text, lock_folder
from retention.provenance import code, lock_sha256
from retention.runfolder import has_checkpoint, remove_run_folder
from retention.study.spec import StudyError, StudyRun, StudySpec

log = logging.getLogger(__name__)

DONE = "study_run.json"
"""Written into a run folder when the run finished; its absence marks the folder incomplete."""
IGNORED_KEYS = ("run.wandb",)
"""Resolved keys that do not change a run's results, left out of its config digest."""


@dataclass
class PlannedRun:
    run: StudyRun
    argv: list[str]
    config: dict[str, Any]
    """The resolved config, flattened (dotted keys)."""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    """The SHA-256 of the data files the config names, by key (:func:`config_files`)."""

    @property
    def digest(self) -> str:
        return digest({k: v for k, v in self.config.items() if k not in IGNORED_KEYS})


class Study:
    """A study spec bound to its folder."""

    def __init__(self, spec: StudySpec, out_dir: str | None = None):
        self.spec = spec
        self.folder = spec.folder(out_dir)
        self.runs_dir = self.folder / "runs"
        self.left: list[str] = []
        """Runs the last :meth:`run` left pending because of its deadline."""

    # -- planning --------------------------------------------------------------------------------------------

    def _config(self, name: str, text: str, write: bool) -> str:
        """A ``--config`` value of the YAML ``text``: the file ``configs/<name>.yaml`` of the study folder
        (written), or with ``write`` false the text itself."""
        return str(atomic_write_text(self.folder / "configs" / f"{name}.yaml", text)) if write else text

    def _argv(self, run: StudyRun | None, overrides: dict[str, Any], write: bool) -> list[str]:
        if isinstance(self.spec.base, dict):
            layers = [self._config("base", yaml.safe_dump(self.spec.base), write)]
        else:
            layers = [str(p) for p in self.spec.base]
        layers.append(self._config(run.name if run else "_base",
                                   yaml.safe_dump(overrides, sort_keys=False, allow_unicode=True), write))
        return [a for layer in layers for a in ("--config", layer)]

    def plan(self, write: bool = True) -> list[PlannedRun]:
        """Every run with its argv and resolved config; raises :class:`StudyError` naming a run that does not
        resolve (a bad key or value), before any model is loaded. With ``write`` false nothing is written (the
        argv then carries the override files' YAML text instead of their paths)."""
        from retention.fitting import resolve_config  # the model and data modules: loaded when a study plans

        n_edit = None
        if self.spec.protocol == "single":
            try:
                base = flatten(resolve_config(self._argv(None, dict(self.spec.set), write)))
            except (Exception, SystemExit) as err:
                raise StudyError(f"study {self.spec.name}: its base config does not resolve: {err}") from None
            n_edit = int(base["edits.n_edit"])
        planned = []
        resolved: dict[str, dict[str, Any]] = {}
        for run in self.spec.expand(n_edit):
            per_run = {"run.name": run.name, "run.tags": run.tags, "edits.single_index": run.fact}
            overrides = {**run.overrides, "run.name": run.name, "run.out_dir": str(self.runs_dir),
                         "run.group": self.spec.name, "run.tags": run.tags}
            argv = self._argv(run, overrides, write)
            # Runs that differ only in name, tags and fact index (the single protocol's N runs) resolve once.
            shared = digest({k: v for k, v in overrides.items() if k not in per_run})
            try:
                if shared not in resolved:
                    resolved[shared] = flatten(resolve_config(argv))
            except (Exception, SystemExit) as err:  # jsonargparse raises ArgumentError; constructors ValueError
                raise StudyError(f"study {self.spec.name}: run {run.name} does not resolve "
                                 f"(overrides {run.overrides}): {err}") from None
            config = {**resolved[shared], **per_run}
            if run.fact is not None and not 0 <= run.fact < int(config["edits.n_edit"]):
                raise StudyError(f"study {self.spec.name}: run {run.name}: fact {run.fact} outside the "
                                 f"{config['edits.n_edit']} edits")
            if n_edit is not None and int(config["edits.n_edit"]) != n_edit:
                raise StudyError(f"study {self.spec.name}: run {run.name} has edits.n_edit "
                                 f"{config['edits.n_edit']}; the single protocol needs the same {n_edit} everywhere")
            planned.append(PlannedRun(run, argv, config, config_files(config)))
        return planned

    # -- state -----------------------------------------------------------------------------------------------

    def finished(self, run: StudyRun) -> dict | None:
        """The finished-run record of ``run``, or None when it has not finished."""
        path = self.runs_dir / run.name / DONE
        if not path.is_file() or not (self.runs_dir / run.name / "summary.json").is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def write_state(self, planned: list[PlannedRun], states: dict[str, dict]) -> None:
        atomic_write_json(self.folder / "study.json", {
            "spec": self.spec.to_dict(),
            "provenance": {"code": code(), "lock_sha256": lock_sha256(), "python": platform.python_version()},
            "runs": [{"name": p.run.name, "cell": dict(p.run.cell), "arm": p.run.arm, "seed": p.run.seed,
                      "fact": p.run.fact, "overrides": p.run.overrides, "config_digest": p.digest,
                      **states.get(p.run.name, {"state": "pending"})} for p in planned],
        })

    def changed(self, planned: list[PlannedRun]) -> list[tuple[str, list[str]]]:
        """Finished runs whose config, or a data file it names, differs from the one they ran with: (name, the
        differing keys; a data file's key as ``<key> (file content)``)."""
        out = []
        for p in planned:
            done = self.finished(p.run)
            if done is None:
                continue
            # Records written before file digests were kept have none: their files count as unchanged.
            old, files = done.get("config", {}), done.get("files", p.files)
            keys = sorted(k for k in set(old) | set(p.config)
                          if k not in IGNORED_KEYS and old.get(k, "<absent>") != p.config.get(k, "<absent>"))
            keys += [f"{k} (file content)" for k in sorted(set(files) | set(p.files))
                     if k not in keys and files.get(k) != p.files.get(k)]
            if keys or done["config_digest"] != p.digest:
                out.append((p.run.name, keys))
        return out

    # -- running ---------------------------------------------------------------------------------------------

    def run(self, jobs: int = 1, redo_changed: bool = False, deadline: float | None = None,
            share: bool = True) -> dict[str, dict]:
        """Run every unfinished run, holding the study folder's lock throughout; returns the state of each run
        by name. With ``deadline`` (seconds from now) no run starts that the mean duration of the finished runs
        says cannot end by then; those are left pending (:attr:`left`) for the next invocation. Runs made in
        this process (``jobs`` 1) with ``share`` tokenise the task and select the facts once
        (:func:`retention.models.shared_loads`). Raises :class:`StudyError` when another process runs the
        study."""
        try:
            lock = lock_folder(self.folder, "retention study process")
        except FolderLocked as err:
            raise StudyError(f"study {self.spec.name}: {err}") from None
        try:
            return self._run(jobs, redo_changed, deadline, share)
        finally:
            lock.release()

    def _discard(self, name: str) -> None:
        """Delete a run's folder, unless a run (a ``retention fit`` started by hand) is using it."""
        try:
            remove_run_folder(self.runs_dir / name)
        except FolderLocked as err:
            raise StudyError(f"study {self.spec.name}: run {name} must be run again, but {err}") from None

    def _can_start(self, t0: float, deadline: float | None, states: dict[str, dict]) -> bool:
        """Whether a run started now ends by the deadline, by the mean duration of the finished runs (with none
        finished yet, a run always starts: there is nothing to estimate from)."""
        seconds = [s["seconds"] for s in states.values() if s["state"] == "done" and s.get("seconds")]
        return deadline is None or not seconds or time.perf_counter() - t0 + statistics.mean(seconds) <= deadline

    def _run(self, jobs: int, redo_changed: bool, deadline: float | None, share: bool) -> dict[str, dict]:
        t0 = time.perf_counter()
        self.left = []
        planned = self.plan()
        changed = self.changed(planned)
        if changed and not redo_changed:
            lines = "\n".join(f"  {name}: {', '.join(keys[:6]) or 'the config digest'}" for name, keys in changed)
            raise StudyError(
                f"study {self.spec.name}: {len(changed)} finished run(s) in {self.runs_dir} ran with another config "
                f"than the study file gives now (differing keys):\n{lines}\nTheir results are not mixed with new "
                "ones: restore the study file, use another name or out_dir, or pass --redo_changed true to "
                "discard and rerun them."
            )
        for name, _ in changed:
            self._discard(name)
        states: dict[str, dict] = {}
        todo = []
        for p in planned:
            done = self.finished(p.run)
            if done is not None:
                states[p.run.name] = {"state": "done", "seconds": done.get("seconds")}
                continue
            folder = self.runs_dir / p.run.name
            if has_checkpoint(folder):
                log.info("run %s was interrupted: it resumes from its checkpoint", p.run.name)
                p = dataclasses.replace(p, argv=[*p.argv, "--ckpt_path", "last"])
            elif folder.exists():
                log.info("run %s was interrupted before its first checkpoint: it starts again", p.run.name)
                self._discard(p.run.name)
            todo.append(p)
        log.info("study %s: %d runs, %d finished before, %d to run (%s)", self.spec.name, len(planned),
                 len(planned) - len(todo), len(todo), f"{jobs} at a time" if jobs > 1 else "in this process")
        self.write_state(planned, states)
        durations: list[float] = []

        def finish(p: PlannedRun, seconds: float, error: str | None) -> None:
            summary = self.runs_dir / p.run.name / "summary.json"
            if error is None and not summary.is_file():
                error = "retention fit returned without a summary.json (no edit or control set measured?)"
            if error is None:
                atomic_write_json(self.runs_dir / p.run.name / DONE,
                                  {"config_digest": p.digest, "config": p.config, "files": p.files,
                                   "seconds": seconds})
                states[p.run.name] = {"state": "done", "seconds": seconds}
            else:
                states[p.run.name] = {"state": "failed", "seconds": seconds, "error": error}
                log.error("run %s failed: %s", p.run.name, error)
            self.write_state(planned, states)
            durations.append(seconds)
            n_done = sum(s["state"] == "done" for s in states.values())
            eta = statistics.mean(durations) * math.ceil((len(todo) - len(durations)) / jobs)
            log.info("study %s: run %s %s in %.0f s; %d/%d runs done, %s elapsed, ETA %s (mean run %.0f s)",
                     self.spec.name, p.run.name, states[p.run.name]["state"], seconds, n_done, len(planned),
                     clock(time.perf_counter() - t0), clock(eta), statistics.mean(durations))

        def can_start() -> bool:
            return self._can_start(t0, deadline, states)

        if jobs <= 1:
            from retention.models import shared_loads

            with shared_loads() if share else contextlib.nullcontext():
                for i, p in enumerate(todo):
                    if not can_start():
                        self.left = [q.run.name for q in todo[i:]]
                        break
                    self._run_here(p, finish)
        else:
            self._run_parallel(todo, jobs, finish, can_start)
        if self.left:
            log.info("study %s: %d run(s) not started, the deadline (%.0f s) would pass first: %s", self.spec.name,
                     len(self.left), deadline, ", ".join(self.left))
        return states

    def _run_here(self, p: PlannedRun, finish) -> None:
        from retention.fitting import fit

        log.info("study %s: run %s (%s, %s, seed %d)", self.spec.name, p.run.name, p.run.cell_label, p.run.arm,
                 p.run.seed)
        t = time.perf_counter()
        try:
            fit(p.argv)
            error = None
        except Exception as err:  # one failed run does not end the study; it is recorded and reported
            error = f"{type(err).__name__}: {err}"
        finish(p, time.perf_counter() - t, error)

    def _run_parallel(self, todo: list[PlannedRun], jobs: int, finish, can_start) -> None:
        import torch

        gpus = torch.cuda.device_count()
        jobs = min(jobs, gpus) if gpus else jobs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        free_gpus = list(range(gpus))
        pending = list(todo)
        running: dict[subprocess.Popen, tuple[PlannedRun, float, int | None, Any]] = {}
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        while pending or running:
            while pending and len(running) < jobs:
                if not can_start():
                    self.left = [q.run.name for q in pending]
                    pending = []
                    break
                p = pending.pop(0)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                gpu = free_gpus.pop(0) if gpus else None
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                out = open(logs / f"{p.run.name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
                proc = subprocess.Popen([sys.executable, "-m", "retention", "fit", *p.argv], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                log.info("study %s: run %s started (pid %d, %d threads%s)", self.spec.name, p.run.name, proc.pid,
                         threads, f", GPU {gpu}" if gpu is not None else "")
                running[proc] = (p, time.perf_counter(), gpu, out)
            time.sleep(0.5)
            for proc in [q for q in running if q.poll() is not None]:
                p, started, gpu, out = running.pop(proc)
                out.close()
                if gpu is not None:
                    free_gpus.append(gpu)
                error = None if proc.returncode == 0 else (
                    f"exit status {proc.returncode}; see {logs / (p.run.name + '.log')}")
                finish(p, time.perf_counter() - started, error)


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _die_with_parent() -> None:
    """In a ``--jobs`` child: be killed when the study process dies (even by ``kill -9``), so a rerun of the
    study never meets a run still writing into a folder it restarts."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
