"""Studies: the study file and its expansion, the statistics against hand-computed values, a tiny study run in
process (resume after an interruption, edit reuse, changed-config detection), a real `kill -9` and a rerun, the
report on a run folder, and `--dry_run` of every shipped study."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_runs import fit_config, prepare

from retention.cli import main as cli_main
from retention.study import Study, StudyError, StudySpec
from retention.study.stats import newcombe, paired_interval, t_interval, t_quantile, wilson

STUDIES = sorted((Path(__file__).resolve().parents[1] / "configs" / "studies").glob("*.yaml"))


# -- the study file ---------------------------------------------------------------------------------------------


def _spec(**fields) -> StudySpec:
    return StudySpec.from_dict({"base": {"trainer": {"max_steps": 1}}, **fields}, source="test.yaml")


def test_grid_arms_and_seeds_expand_to_their_product_with_overrides_in_order():
    spec = _spec(
        set={"trainer.max_steps": 5, "freeze.policy": "none"},
        grid={"editor": [{"edits.editor": "rome", "edits.mode": "sequential"},
                         {"edits.editor": "alphaedit", "edits.mode": "batch"}],
              "model.adapter.method": ["full", "lora"]},
        arms={"baseline": {}, "frozen": {"freeze.policy": "edited"}},
        seeds=[0, 1, 2],
    )
    runs = spec.expand()
    assert len(runs) == 2 * 2 * 2 * 3 and len({r.name for r in runs}) == len(runs)
    first = runs[0]
    assert first.name == "editor=rome-sequential__model.adapter.method=full__baseline__seed0"
    assert first.cell == (("editor", "rome-sequential"), ("model.adapter.method", "full"))
    frozen = next(r for r in runs if r.arm == "frozen" and r.seed == 2 and dict(r.cell)["editor"] == "alphaedit-batch")
    o = frozen.overrides
    # set < grid < arm < seed
    assert o["freeze.policy"] == "edited" and o["trainer.max_steps"] == 5 and o["edits.editor"] == "alphaedit"
    assert o["seed_everything"] == o["edits.seed"] == o["paraphrases.seed"] == 2
    assert frozen.tags == ["arm=frozen", "editor=alphaedit-batch", "model.adapter.method=full", "seed=2"]


def test_single_protocol_runs_one_fact_per_run():
    runs = _spec(protocol="single", seeds=[0, 1]).expand(n_edit=4)
    assert [(r.seed, r.fact) for r in runs] == [(s, i) for s in (0, 1) for i in range(4)]
    assert all(r.overrides["edits.mode"] == "single" and r.overrides["edits.single_index"] == r.fact for r in runs)
    with pytest.raises(StudyError, match="n_edit"):
        _spec(protocol="single").expand(n_edit=0)


@pytest.mark.parametrize("fields, message", [
    ({"arms": {"a": {}}, "baseline": "b"}, "field 'baseline': 'b' is not an arm"),
    ({"seeds": [0, 0]}, "field 'seeds': repeated"),
    ({"grid": {"x": []}}, "field 'grid.x'"),
    ({"protocol": "pairs"}, "field 'protocol'"),
    ({"arm": {}}, "field 'arm': unknown field"),
    ({"name": "../up"}, "field 'name'"),
])
def test_bad_study_files_name_the_field(fields, message):
    with pytest.raises(StudyError, match=message):
        _spec(**fields)


def test_a_missing_base_file_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: nowhere.yaml\n")
    with pytest.raises(StudyError, match=r"field 'base': config file .*nowhere.yaml does not exist"):
        StudySpec.from_file(path)


# -- statistics against hand-computed values --------------------------------------------------------------------


def test_t_quantiles_match_the_tables():
    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_t_interval_by_hand():
    # mean 0.7, sd = sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1, half = 4.3027 * 0.1 / sqrt(3) = 0.24842
    i = t_interval([0.6, 0.7, 0.8])
    assert (i.estimate, i.low, i.high, i.n) == pytest.approx((0.7, 0.45158, 0.94842, 3), abs=1e-5)
    assert t_interval([0.6, 0.7, 0.8], bounds=(0.0, 0.9)).high == 0.9
    one = t_interval([0.5])
    assert one.estimate == 0.5 and math.isnan(one.low)
    assert t_interval([float("nan"), 0.2, 0.4]).n == 2


def test_paired_interval_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half 0.24842 -> excludes zero? no: low = -0.04842
    d = paired_interval([0.9, 0.8, 0.7], [0.8, 0.6, 0.4])
    assert (d.estimate, d.low, d.high) == pytest.approx((0.2, -0.04842, 0.44842), abs=1e-5)
    assert not d.excludes_zero
    # differences 0.2, 0.22, 0.24: sd 0.02, half 0.049684 -> [0.170316, 0.269684]
    d = paired_interval([0.9, 0.92, 0.94], [0.7, 0.7, 0.7])
    assert (d.low, d.high) == pytest.approx((0.170316, 0.269684), abs=1e-5) and d.excludes_zero


def test_wilson_and_newcombe_by_hand():
    # Wilson, 8 of 10, z = 1.959964: centre (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half 1.959964 * sqrt(0.016 + 0.0096036) / 1.384146 = 0.226581
    w = wilson(8, 10)
    assert (w.estimate, w.low, w.high) == pytest.approx((0.8, 0.490159, 0.943321), abs=1e-5)
    assert (wilson(0, 5).low, wilson(5, 5).high) == (0.0, 1.0)
    # Newcombe: 8/10 - 4/10 with Wilson(4, 10) = [0.168180, 0.687326]
    d = newcombe(8, 10, 4, 10)
    low = 0.4 - math.sqrt((0.8 - 0.490159) ** 2 + (0.687326 - 0.4) ** 2)
    high = 0.4 + math.sqrt((0.943321 - 0.8) ** 2 + (0.4 - 0.168180) ** 2)
    assert (d.estimate, d.low, d.high) == pytest.approx((0.4, low, high), abs=1e-5)


# -- a tiny study, in process -----------------------------------------------------------------------------------


def _write_study(root: Path, tokenizer) -> Path:
    """A study file: the tiny pipeline run, arms baseline and freeze-edited, seeds 0 and 1 (4 runs)."""
    prepare(root, tokenizer)
    (root / "base.yaml").write_text(yaml.safe_dump(fit_config(root, protocols=["top1", "prob"])))
    study = {"name": "tiny", "base": "base.yaml", "out_dir": str(root / "studies"),
             "arms": {"baseline": {}, "frozen": {"freeze.policy": "edited"}}, "seeds": [0, 1]}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def tiny_study(tmp_path, tiny_llama, monkeypatch) -> Path:
    """The tiny study file in ``tmp_path``, not run yet."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    return _write_study(tmp_path, tiny_llama[1])


def _study_main(path: Path, *extra: str) -> int:
    return cli_main(["study", "--config", str(path), *extra])


class _Messages(logging.Handler):
    """Keeps the messages logged to it (caplog is per test; the study below is run once per module)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama) -> tuple[Path, list[str]]:
    """The tiny study run once to the end, for the tests that only read it: (its file, the runner's log messages)."""
    root = tmp_path_factory.mktemp("finished")
    path, messages, logger = _write_study(root, tiny_llama[1]), _Messages(), logging.getLogger("retention.study.runner")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(messages)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RETENTION_CACHE", str(root / "cache"))
            assert _study_main(path) == 0
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return path, messages.messages


def _state(path: Path) -> dict:
    return json.loads((path.parent / "studies" / "tiny" / "study.json").read_text())


def _respec(path: Path, **fields) -> None:
    """Changes fields of the study file, e.g. one seed for a test that needs the runs of one seed only."""
    spec = yaml.safe_load(path.read_text())
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_study_runs_reports_and_shares_the_edit(finished):
    tiny_study, messages = finished
    progress = [m for m in messages if "runs done" in m]
    assert len(progress) == 4 and "4/4 runs done" in progress[-1] and "ETA 0:00:00" in progress[-1]
    assert re.search(r"; 1/4 runs done, \d:\d\d:\d\d elapsed, ETA \d:\d\d:\d\d \(mean run \d+ s\)$", progress[0])
    folder = tiny_study.parent / "studies" / "tiny"
    state = _state(tiny_study)
    assert [r["state"] for r in state["runs"]] == ["done"] * 4
    reused = {r["name"]: json.loads((folder / "runs" / r["name"] / "summary.json").read_text())["run"]["reused"]
              for r in state["runs"]}
    # Seeds draw different facts: the baseline arm edits, the frozen arm of the same seed reuses that edit.
    assert reused["baseline__seed0"]["edit"] is False and reused["frozen__seed0"]["edit"] is True
    assert reused["baseline__seed1"]["edit"] is False and reused["frozen__seed1"]["edit"] is True
    report = folder / "report"
    rows = (report / "report.csv").read_text().splitlines()
    assert rows[0].startswith("study,cell,arm,protocol,group,step,final,n_seeds")
    assert any(",baseline,prob,edit,3,True,2," in r for r in rows)
    comparisons = (report / "comparisons.csv").read_text()
    assert "arm - baseline" in comparisons and "edited - intrinsic" in comparisons
    markdown = (report / "report.md").read_text()
    assert "| frozen | prob |" in markdown and "![retention curves, tiny: all](curves_all.png)" in markdown
    assert (report / "curves_all.png").stat().st_size > 10_000 and (report / "final_retention.png").exists()


def test_reused_edit_gives_the_same_retention_as_editing_again(tiny_study, tmp_path):
    from retention.commands.fit import main as fit_main

    base = tmp_path / "base.yaml"
    for name, cache in (("first", "true"), ("reused", "true"), ("fresh", "false")):
        assert fit_main(["--config", str(base), "--run.name", name, "--edits.cache", cache,
                         "--monitor.share_t0", cache]) == 0
    out = {}
    for name in ("first", "reused", "fresh"):
        folder = tmp_path / "runs" / name
        summary = json.loads((folder / "summary.json").read_text())
        probes = sorted((folder / "probes").iterdir())
        out[name] = (summary["retention"], summary["t0"], [p.read_text() for p in probes], summary["run"]["reused"],
                     summary["run"]["t0_reused"])
    assert out["reused"][3] == {"edit": True} and out["fresh"][3] == {"edit": False}
    assert (out["first"][4], out["reused"][4], out["fresh"][4]) == (0, 1, 0)
    assert out["reused"][:3] == out["first"][:3] == out["fresh"][:3]


def test_interrupted_study_resumes_to_the_same_report(tiny_study, finished, tmp_path, monkeypatch):
    """A run cut off mid-fit (after its t=0 files are written) is restarted from nothing; finished runs are kept;
    the final report.csv equals that of the uninterrupted study (the same study file in another folder)."""
    from retention.callbacks.report import RunReport

    folder = tmp_path / "studies" / "tiny"
    expected = (finished[0].parent / "studies" / "tiny" / "report" / "report.csv").read_text()
    calls = {"n": 0}
    original = RunReport.on_train_batch_end

    class Killed(BaseException):
        """Stands for the process dying: not an Exception, so neither Lightning nor the study handles it."""

    def crash_in_third_run(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the third run, step 2: probes of t=0 and step 2 written, no summary
            raise Killed

    monkeypatch.setattr(RunReport, "on_train_batch_end", crash_in_third_run)
    with pytest.raises(Killed):
        _study_main(tiny_study)
    monkeypatch.setattr(RunReport, "on_train_batch_end", original)
    state = _state(tiny_study)
    assert [r["state"] for r in state["runs"]] == ["done", "done", "pending", "pending"]
    cut = folder / "runs" / state["runs"][2]["name"]
    assert (cut / "probes" / "step_000002.jsonl").exists() and not (cut / "summary.json").exists()
    kept = {r["name"]: (folder / "runs" / r["name"] / "study_run.json").stat().st_mtime_ns for r in state["runs"][:2]}

    assert _study_main(tiny_study) == 0
    assert [r["state"] for r in _state(tiny_study)["runs"]] == ["done"] * 4
    assert {n: (folder / "runs" / n / "study_run.json").stat().st_mtime_ns for n in kept} == kept
    assert (folder / "report" / "report.csv").read_text() == expected


def test_a_changed_config_is_reported_not_mixed(tiny_study, tmp_path, capsys):
    _respec(tiny_study, seeds=[0])
    assert _study_main(tiny_study) == 0
    base = tmp_path / "base.yaml"
    config = yaml.safe_load(base.read_text())
    config["trainer"]["max_steps"] = 4
    base.write_text(yaml.safe_dump(config))
    assert _study_main(tiny_study) == 2
    err = capsys.readouterr().err
    assert "2 finished run(s)" in err and "trainer.max_steps" in err and "--redo_changed" in err
    assert _study_main(tiny_study, "--redo_changed", "true") == 0
    summary = json.loads((tmp_path / "studies" / "tiny" / "runs" / "baseline__seed0" / "summary.json").read_text())
    assert summary["final_step"] == 4


def test_a_run_that_cannot_resolve_stops_the_study_before_any_run(tiny_study, tmp_path, capsys):
    spec = yaml.safe_load(tiny_study.read_text())
    spec["arms"]["broken"] = {"freeze.policy": "list", "freeze.layers": [7]}  # no layer 7 in a 2-layer model
    tiny_study.write_text(yaml.safe_dump(spec))
    assert _study_main(tiny_study) == 2
    assert "run broken__seed0 does not resolve" in capsys.readouterr().err
    assert not (tmp_path / "studies" / "tiny" / "runs").exists()


def test_a_failed_run_is_recorded_and_the_study_goes_on(tiny_study, tmp_path, capsys):
    # Valid as a config, so it is found only when the run reads its facts; the frozen arm runs after it.
    broken = {"edits.knowledge": str(tmp_path / "missing_facts.jsonl")}
    _respec(tiny_study, arms={"baseline": {}, "broken": broken, "frozen": {"freeze.policy": "edited"}}, seeds=[0])
    assert _study_main(tiny_study) == 1
    runs = _state(tiny_study)["runs"]
    assert [(r["name"], r["state"]) for r in runs] == [("baseline__seed0", "done"), ("broken__seed0", "failed"),
                                                      ("frozen__seed0", "done")]
    assert "missing_facts" in runs[1]["error"]
    assert "failed runs (1): broken__seed0" in capsys.readouterr().err


def test_report_on_a_single_run_folder_uses_wilson(tiny_study, tmp_path):
    from retention.commands.fit import main as fit_main

    assert fit_main(["--config", str(tmp_path / "base.yaml"), "--run.name", "solo"]) == 0
    assert cli_main(["report", str(tmp_path / "runs" / "solo"), "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "runs" / "solo" / "summary.json").read_text())
    k, n = summary["retention"]["prob"]["edit"]["count"], summary["retention"]["prob"]["edit"]["denominator"]
    w = wilson(k, n)
    row = next(r for r in (tmp_path / "rep" / "report.csv").read_text().splitlines()
               if ",solo,prob,edit,3,True," in r)
    fields = row.split(",")
    assert fields[7] == "1"  # one seed: no t-interval
    assert [float(x) for x in fields[-3:]] == pytest.approx([w.estimate, w.low, w.high], abs=1e-5)
    assert f"({k}/{n})" in (tmp_path / "rep" / "report.md").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "neither a study folder" in capsys.readouterr().err


# -- a real kill -9 ----------------------------------------------------------------------------------------------


def test_study_killed_with_sigkill_finishes_when_run_again(tiny_study, tmp_path):
    _respec(tiny_study, seeds=[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RETENTION_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "retention", "study", "--config", str(tiny_study)]
    folder = tmp_path / "studies" / "tiny"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # Kill once the second run has measured t=0 (mid-run: its summary is not written yet).
        while not (folder / "runs" / "frozen__seed0" / "probes").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the study ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (folder / "report").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((folder / "study.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["done"] * 2
    assert (folder / "report" / "report.csv").exists()


# -- shipped studies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_resolve_in_a_dry_run(path, tmp_path, capsys):
    assert _study_main(path, "--dry_run", "true", "--out_dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    n = int(out.split("study ")[1].split(": ")[1].split(" runs")[0])
    spec = StudySpec.from_file(path)
    assert n >= len(spec.arms) * len(spec.seeds) and out.count("\n  ") == n
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_clock():
    from retention.study.runner import clock

    assert [clock(s) for s in (0, 59.6, 3600 + 62, 36000)] == ["0:00:00", "0:01:00", "1:01:02", "10:00:00"]


def test_study_plan_names_a_run_that_does_not_resolve(tmp_path):
    (tmp_path / "base.yaml").write_text("trainer: {max_steps: 2}\n")
    spec = StudySpec.from_dict({"base": "base.yaml", "arms": {"bad": {"freeze.policy": "sideways"}},
                                "out_dir": str(tmp_path)}, root=tmp_path)
    with pytest.raises(StudyError, match=r"run bad__seed0 does not resolve .*freeze.policy"):
        Study(spec).plan()


def test_jobs_run_as_subprocesses_with_their_logs(tiny_study, tmp_path):
    _respec(tiny_study, seeds=[0])
    assert _study_main(tiny_study, "--jobs", "2") == 0
    folder = tmp_path / "studies" / "tiny"
    state = json.loads((folder / "study.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["done"] * 2
    for run in state["runs"]:
        assert (folder / "runs" / run["name"] / "summary.json").exists()
        assert "Retention after 3 fine-tuning steps" in (folder / "logs" / f"{run['name']}.log").read_text()
    assert (folder / "report" / "report.csv").exists()


def test_runs_are_grouped_and_tagged_in_wandb(tmp_path, monkeypatch):
    from retention.runlog import run_loggers

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):  # run_loggers sets them; restored afterwards
        monkeypatch.setenv(var, str(tmp_path))

    _, wandb = run_loggers(tmp_path, "r", "offline", group="paper", tags=["arm=baseline", "seed=0"])
    assert wandb._wandb_init["group"] == "paper" and wandb._wandb_init["tags"] == ["arm=baseline", "seed=0"]


@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute", "a/b"])
def test_fit_refuses_a_run_name_that_is_a_path(tiny_study, tmp_path, name):
    from retention.commands.fit import main as fit_main

    with pytest.raises(ValueError, match="run.name .* must be a plain folder name"):
        fit_main(["--config", str(tmp_path / "base.yaml"), "--run.name", name])
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("study", ["paper_smollm2_cpu", "cheng_2511_05852"])
def test_print_config_round_trips_from_another_folder(study, tmp_path, capsys, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "configs" / "studies" / f"{study}.yaml"
    original = StudySpec.from_file(path)
    assert cli_main(["study", "-c", str(path), "--print_config"]) == 0
    printed = tmp_path / "elsewhere" / "study.yaml"
    printed.parent.mkdir()
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    monkeypatch.chdir(printed.parent)
    again = StudySpec.from_file(printed)
    assert [(r.name, r.overrides) for r in again.expand(8)] == [(r.name, r.overrides) for r in original.expand(8)]
    if isinstance(original.base, list):
        assert again.base == [p.resolve() for p in original.base]
    else:  # an inline fit config
        assert again.base == original.base


def test_a_deadline_leaves_the_runs_it_cannot_finish_pending(tiny_study, capsys):
    # With no run finished there is no estimate, so the first run starts; it takes longer than the 1 s deadline.
    assert _study_main(tiny_study, "--deadline", "1") == 0
    states = [r["state"] for r in _state(tiny_study)["runs"]]
    assert states == ["done", "pending", "pending", "pending"]
    out = capsys.readouterr().out
    assert "--deadline 1 s: 3 run(s) not started, left pending" in out and "frozen__seed1" in out
    assert _study_main(tiny_study) == 0
    assert [r["state"] for r in _state(tiny_study)["runs"]] == ["done"] * 4


def test_study_main_runs_without_the_console_script(tmp_path, capsys):
    from retention.commands.study import main

    (tmp_path / "base.yaml").write_text("trainer: {max_steps: 2}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "out_dir": str(tmp_path / "o")}))
    assert main(["--config", str(tmp_path / "s.yaml"), "--dry_run", "true"]) == 0
    assert "study s: 1 runs" in capsys.readouterr().out and not (tmp_path / "o").exists()
