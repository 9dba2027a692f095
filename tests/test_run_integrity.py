"""A resume is the run it claims to be (another config or data is refused unless named, and then recorded),
and a run folder belongs to one run at a time (a lock held for the life of a run or a study)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_runs import fit_config, prepare

from retention.callbacks.checkpoint import RUN_KEY, CheckpointError, load_checkpoint
from retention.commands.fit import main as fit_main
from retention.io import FolderLocked, lock_folder

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def kept(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    """A finished 4-step run that kept its checkpoint (step 4): (config, run folder)."""
    root = tmp_path_factory.mktemp("integrity")
    prepare(root, tiny_llama[1])
    config = fit_config(root, "kept", protocols=["top1"], max_steps=4)
    config["run"].update(checkpoint_every=2, keep_checkpoint=True)
    path = root / "kept.yaml"
    path.write_text(yaml.safe_dump(config))
    assert fit_main(["--config", str(path)]) == 0
    return path, root / "runs" / "kept"


def _lr_by_step(folder: Path) -> dict[int, float]:
    with open(folder / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}


def test_the_checkpoint_records_the_config_and_data_it_ran_with(kept):
    config, folder = kept
    record = load_checkpoint(folder / "checkpoints" / "last.ckpt")[RUN_KEY]
    assert record["config"]["model.optimizer.lr"] == 0.01 and record["changes"] == []
    assert set(record["files"]) == {"data.task.source"} and len(record["files"]["data.task.source"]) == 64


def test_a_resume_with_another_learning_rate_is_refused(kept):
    config, folder = kept
    before = (folder / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"not the run that wrote the checkpoint.*\n  "
                                              r"model.optimizer.lr: 0.01 in the checkpoint, 0.005 now"):
        fit_main(["--config", str(config), "--ckpt_path", "last", "--model.optimizer.lr", "5e-3"])
    with pytest.raises(CheckpointError, match=r"\n  trainer.max_steps: 4 in the checkpoint, 6 now\n.*"
                                              r"--run.resume_changes '\[trainer.max_steps\]'"):
        fit_main(["--config", str(config), "--ckpt_path", "last", "--model.optimizer.lr", "5e-3",
                  "--trainer.max_steps", "6", "--run.resume_changes", "[model.optimizer.lr]"])
    with pytest.raises(ValueError, match=r"resume_changes: \['model.optimizer.learning_rate'\] are not keys"):
        fit_main(["--config", str(config), "--ckpt_path", "last",
                  "--run.resume_changes", "[model.optimizer.learning_rate]"])
    assert (folder / "config.yaml").read_text() == before


def test_a_resume_with_changed_data_is_refused(kept, tmp_path):
    config, folder = kept
    data = yaml.safe_load(config.read_text())
    source = tmp_path / "same.jsonl"
    source.write_text(Path(data["data"]["task"]["source"]).read_text().replace("zorp", "zarp"))
    data["data"]["task"]["source"] = str(source)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=r"  data.task.source: '.*same.jsonl' in the checkpoint"):
        fit_main(["--config", str(changed), "--ckpt_path", "last"])
    source.write_text(Path(Path(str(config)).parent / "same.jsonl").read_text())  # same bytes, another file
    with pytest.raises(CheckpointError, match="data.task.source"):
        fit_main(["--config", str(changed), "--ckpt_path", "last"])


def test_an_allowed_change_runs_and_config_yaml_records_both_values(kept):
    config, folder = kept
    assert fit_main(["--config", str(config), "--ckpt_path", "last", "--model.optimizer.lr", "5e-3",
                     "--trainer.max_steps", "6",
                     "--run.resume_changes", "[model.optimizer.lr,trainer.max_steps]"]) == 0
    lr = _lr_by_step(folder)
    assert [lr[s] for s in range(6)] == pytest.approx([0.01] * 4 + [0.005] * 2)  # the new rate trained on
    text = (folder / "config.yaml").read_text()
    assert yaml.safe_load(text)["model"]["optimizer"]["lr"] == 0.005
    assert "#   model.optimizer.lr: 0.01 up to step 4, then 0.005\n" in text
    assert "#   trainer.max_steps: 4 up to step 4, then 6\n" in text
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    change = {"step": 4, "key": "model.optimizer.lr", "before": 0.01, "after": 0.005}
    assert change in hparams["resume_changes"]
    record = load_checkpoint(folder / "checkpoints" / "last.ckpt")[RUN_KEY]
    assert record["config"]["model.optimizer.lr"] == 0.005 and len(record["changes"]) == 2
    assert json.loads((folder / "summary.json").read_text())["final_step"] == 6


# -- one run per folder --------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_no_run_wrote(kept, tmp_path):
    config, _ = kept
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=f"run.overwrite: {victim} is not a run folder"):
        fit_main(["--config", str(config), "--run.out_dir", str(tmp_path), "--run.name", "victim",
                  "--run.overwrite", "true"])
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]


def test_overwrite_refuses_a_folder_whose_lock_is_held(kept):
    config, folder = kept
    lock = lock_folder(folder, "run")
    try:
        with pytest.raises(FolderLocked, match=f"{folder} is in use by another run"):
            fit_main(["--config", str(config), "--run.overwrite", "true"])
    finally:
        lock.release()
    assert (folder / "summary.json").exists()


def _retention(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retention", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_live_study_and_its_runs_cannot_be_clobbered_by_other_processes(tmp_path, tiny_llama):
    """Process A runs a study whose run waits at step 1; meanwhile process B runs the same study, and process
    C overwrites A's live run: both stop with a message, and A finishes a run folder that is A's alone."""
    prepare(tmp_path, tiny_llama[1])
    release = tmp_path / "release"
    base = fit_config(tmp_path, protocols=["top1"])
    base["trainer"]["callbacks"] = [{"class_path": "tiny_runs.WaitAt",
                                     "init_args": {"step": 1, "path": str(release)}}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", "out_dir": str(tmp_path / "studies")}))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "RETENTION_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "studies" / "s" / "runs" / "baseline__seed0"
    with open(tmp_path / "a.log", "w") as log:
        a = subprocess.Popen([sys.executable, "-m", "retention", "study", "--config", str(study)], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not release.with_name("release.waiting").exists():
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.1)
        b = _retention("study", "--config", str(study), env=env)
        c = _retention("fit", "--config", str(tmp_path / "base.yaml"), "--run.out_dir", str(run.parent),
                       "--run.name", run.name, "--run.overwrite", "true", env=env)
    finally:
        release.touch()
        a.wait(timeout=300)
    busy = f"retention study: study s: {run.parent.parent} is in use by another retention study process"
    assert b.returncode == 2 and busy in b.stderr
    assert c.returncode == 2 and c.stderr.strip().splitlines()[-1].startswith(
        f"retention fit: error: {run} is in use by another run")
    assert a.returncode == 0, (tmp_path / "a.log").read_text()[-3000:]
    state = json.loads((tmp_path / "studies" / "s" / "study.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["done"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["overwrite"] is False and config["run"]["group"] == "s"  # A's config, not C's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 3 and sorted(p.name for p in (run / "probes").iterdir()) == [
        "step_000000.jsonl", "step_000002.jsonl", "step_000003.jsonl"]
    assert not (run / "incomplete.json").exists()


def test_a_failed_start_leaves_no_folder_to_block_the_corrected_rerun(kept, tmp_path):
    config, _ = kept
    with pytest.raises(Exception, match="missing.jsonl"):
        fit_main(["--config", str(config), "--run.name", "typo",
                  "--edits.knowledge", str(tmp_path / "missing.jsonl")])
    assert not (config.parent / "runs" / "typo").exists()
    assert fit_main(["--config", str(config), "--run.name", "typo", "--run.keep_checkpoint", "false"]) == 0


def test_task_records_skipped_are_counted_in_the_summary(kept, tmp_path):
    config, _ = kept
    source = tmp_path / "task.jsonl"
    bad = '{"instruction": "no output"}\n{not json\n'
    source.write_text((config.parent / "same.jsonl").read_text() + bad)
    assert fit_main(["--config", str(config), "--run.name", "skips", "--run.keep_checkpoint", "false",
                     "--data.task.source", str(source), "--data.task.on_error", "skip"]) == 0
    run = json.loads((config.parent / "runs" / "skips" / "summary.json").read_text())["run"]
    assert (run["task_records_read"], run["task_records_skipped"]) == (40, 2)
