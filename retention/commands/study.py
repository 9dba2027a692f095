"""``retention study``: run a whole study (grid cells x arms x seeds, or the single-edit protocol) as one
resumable command, then write its report.

    retention study -c configs/studies/paper_smollm2_cpu.yaml
    retention study -c configs/studies/paper_gpt2xl.yaml --dry_run true
    retention study -c my_study.yaml --jobs 4            # 4 runs at a time (one per GPU where GPUs exist)
    retention study -c my_study.yaml --deadline 3600     # start no run that cannot end within the hour
    retention study -c my_study.yaml --print_config > resolved.yaml   # the study as resolved; -c takes it back

Re-running the same command after an interruption (even ``kill -9``) keeps the finished runs and redoes the one
that was cut off. See docs/studies.md.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from jsonargparse.typing import PositiveInt

from retention.commands.options import command_parser, to_args


@dataclass
class StudyArgs:
    """Which study to run and how."""

    config: str
    """The study file (YAML): base fit config, grid, arms, seeds, protocol (see docs/studies.md)."""
    out_dir: str | None = None
    """Folder holding study folders; default the study file's ``out_dir`` (runs/studies)."""
    dry_run: bool = False
    """Print the expanded runs and check that every run's config resolves, without loading a model or writing
    anything."""
    jobs: PositiveInt = 1
    """Runs at a time: 1 runs them one after another in this process; N > 1 runs N subprocesses (CPU threads
    split between them; at most one run per GPU where GPUs exist)."""
    deadline: PositiveInt | None = None
    """Seconds from now: start no run that cannot end by then (estimated by the mean duration of the finished
    runs); the runs left are listed and the same command without it (or with a new one) runs them later."""
    redo_changed: bool = False
    """Discard and rerun finished runs whose config changed since they ran (default: stop and list them)."""
    report: bool = True
    """Write the report into <study folder>/report when the runs are done."""
    print_config: bool = False
    """Print the study file as resolved (fit config paths absolute) and stop; ``-c`` takes the output back."""


ARGS = StudyArgs


def parser():
    # -c/--config is the study file itself, so --print_config prints the study (StudySpec.as_study_file), not these options.
    p = command_parser(StudyArgs, __doc__.split("\n\n")[0], config=False, skip={"config", "print_config"})
    p.add_argument("-c", "--config", required=True,
                   help="The study file (YAML): base fit config, grid, arms, seeds, protocol (see docs/studies.md).")
    # jsonargparse hands a bare --print_config over as "--print_config=" (its own option takes flags).
    p.add_argument("--print_config", nargs="?", const=True, default=False, type=lambda value: True,
                   help="Print the study file as resolved (fit config paths absolute) and stop; -c takes it back.")
    return p


def execute(args: StudyArgs) -> int:
    from retention.study import Study, StudyError, StudySpec
    from retention.study.report import write_report
    from retention.study.webpage import write_html

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    try:
        spec = StudySpec.from_file(args.config)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(spec.as_study_file(), sort_keys=False), end="")
            return 0
        study = Study(spec, args.out_dir)
        if args.dry_run:
            planned = study.plan(write=False)
            print(f"study {spec.name}: {len(planned)} runs into {study.folder}; every config resolves")
            for p in planned:
                overrides = ", ".join(f"{k}={v}" for k, v in p.run.overrides.items())
                print(f"  {p.run.name}: {overrides}")
            return 0
        states = study.run(args.jobs, args.redo_changed, args.deadline)
    except StudyError as err:
        print(f"retention study: {err}", file=sys.stderr)
        return 2
    failed = [name for name, s in states.items() if s["state"] != "done"]
    if study.left:
        print(f"study {spec.name}: --deadline {args.deadline} s: {len(study.left)} run(s) not started, left pending "
              f"(run the same command again to run them): {', '.join(study.left)}")
    print(f"study {spec.name}: {len(states) - len(failed)} of {len(states)} runs finished "
          f"({time.perf_counter() - t0:.0f} s); folder {study.folder}")
    if args.report and len(failed) < len(states):
        paths = write_report([study.folder], study.folder / "report")
        paths["html"] = write_html([study.folder], study.folder / "report")
        print((study.folder / "report" / "report.md").read_text(encoding="utf-8"))
        print("report: " + ", ".join(str(p) for p in paths.values()))
    if failed:
        print(f"failed runs ({len(failed)}): {', '.join(failed)}; their errors are in {study.folder / 'study.json'}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """``retention study ARGV`` in this process, without the console script (``retention.api.run_study``)."""
    return execute(to_args(StudyArgs, parser().parse_args(argv)))
