"""Edge cases that gave silent wrong results: a run counted twice by the report, run names that collide after
sanitising, an empty protocol list found only after the fine-tune, and a misspelt classification label."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from tiny_runs import fit_config, prepare

from retention.cli import main as cli_main
from retention.commands.fit import main as fit_main
from retention.data.readers import ReadReport
from retention.data.tasks import classify
from retention.data.tasks.task import TaskConfig
from retention.fitting import resolve_config
from retention.modules.finetune import OptimizerArgs
from retention.records import RecordError
from retention.study.report import load_results
from retention.study.spec import StudyError, StudySpec


def _run_folder(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    summary = {"run": {"seed": seed}, "final_step": 3, "timings": {"fit_seconds": 1.0 + seed},
               "measurements": [{"step": 3, "retention": {}}]}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_report_counts_a_run_given_twice_once(tmp_path, monkeypatch):
    base = _run_folder(tmp_path / "runs" / "base")
    _run_folder(tmp_path / "runs" / "other", seed=1)
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(base, copy)
    monkeypatch.chdir(tmp_path)
    results, _, _ = load_results(["runs/base", "./runs/base/", str(base), str(copy), "runs/other"])
    assert [r.folder for r in results] == [Path("runs/base"), Path("runs/other")]
    assert [r.condition.study for r in results] == ["base", "other"]


def test_run_names_that_collide_after_sanitising_are_refused_at_plan_time():
    grid = {"data.task.source": ["a b", "a_b"]}
    spec = StudySpec.from_dict({"base": {"trainer": {"max_steps": 1}}, "grid": grid}, source="s.yaml")
    with pytest.raises(StudyError, match=r"s.yaml: field 'grid': cells \(data.task.source=a b\) and "
                                         r"\(data.task.source=a_b\) both give the run folder "
                                         r"'data.task.source=a_b__baseline__seed0'"):
        spec.expand()


@pytest.mark.parametrize("flags, message", [
    (["--monitor.protocols", "[]"], "monitor.protocols is empty"),
    (["--monitor.batch_size", "0"], "monitor.batch_size=0"),
])
def test_monitor_options_are_checked_when_parsing(tmp_path, tiny_llama, flags, message):
    prepare(tmp_path, tiny_llama[1])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fit_config(tmp_path, "x")))
    with pytest.raises(ValueError, match=message):
        resolve_config(["--config", str(config), *flags])


def _classify(tmp_path: Path, rows: list[str], **config) -> list:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "label": label}) + "\n"
                            for i, label in enumerate(rows)))
    task = TaskConfig(family="classify", source=str(path), **config)
    return classify.load(task, ReadReport(str(path), on_error=task.on_error))


def test_a_misspelt_label_is_refused_not_a_third_class(tmp_path):
    labels = ["positive", "negative"] * 60 + ["positve"]
    with pytest.raises(RecordError, match=r"label 'positve' appears in 1 of 121 records and is within one or "
                                          r"two letters of 'positive' \(60 records\)"):
        _classify(tmp_path, labels)
    words = ["spam", "ham"] * 100 + ["spamm", "spamm", "spamm"]
    with pytest.raises(RecordError, match="label 'spamm' appears in 3 of 203 records and is within one"):
        _classify(tmp_path, words)
    with pytest.raises(RecordError, match="label 'maybe' appears in 1 of 201 records and is that rare"):
        _classify(tmp_path, ["yes", "no"] * 100 + ["maybe"])


def test_declared_labels_accept_rare_ones_and_reject_others(tmp_path):
    labels = ["spam", "ham"] * 100 + ["scam"]
    examples = _classify(tmp_path, labels, labels=["spam", "ham", "scam"])
    assert Counter(e.answer for e in examples) == {"spam": 100, "ham": 100, "scam": 1}
    kept = _classify(tmp_path, labels + ["spma"], labels=["spam", "ham", "scam"], on_error="skip")
    assert len(kept) == 201
    with pytest.raises(RecordError, match=r"line 202.*label 'spma' is not one of task.labels"):
        _classify(tmp_path, labels + ["spma"], labels=["spam", "ham", "scam"])


def test_short_and_balanced_label_sets_pass(tmp_path):
    assert len(_classify(tmp_path, ["A", "B", "C", "D"] * 3)) == 12  # letters are never typos of each other
    assert len(_classify(tmp_path, ["pos", "neg", "neutral"] * 10)) == 30


# -- weak cases ----------------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path, tiny_llama) -> Path:
    prepare(tmp_path, tiny_llama[1])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(fit_config(tmp_path, "x")))
    return path


def test_abbreviated_flags_are_refused(config):
    with pytest.raises(Exception, match="unrecognized arguments: --trainer.max_step 5"):
        resolve_config(["--config", str(config), "--trainer.max_step", "5"])
    with pytest.raises(SystemExit):
        cli_main(["report", str(config.parent), "--ou", "x"])


@pytest.mark.parametrize("lr", ["0", "-1e-3"])
def test_a_learning_rate_that_is_not_a_positive_finite_number_is_refused(config, lr):
    with pytest.raises(ValueError, match=f"optimizer.lr must be a positive finite number, got {float(lr)}"):
        resolve_config(["--config", str(config), f"--model.optimizer.lr={lr}"])
    for bad in (float("inf"), float("nan")):  # the command line refuses these already, a config might not
        with pytest.raises(ValueError, match=f"got {bad}"):
            OptimizerArgs(lr=bad)


def test_a_huge_learning_rate_is_warned_about(config, caplog):
    resolve_config(["--config", str(config), "--model.optimizer.lr", "1e20"])
    assert "optimizer.lr=1e+20 is above 1" in caplog.text


def test_invalid_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    with pytest.raises(ValueError, match=f"--config {bad}: not valid YAML"):
        fit_main(["--config", str(bad)])
    assert cli_main(["probe", "-c", str(bad)]) == 2
    assert f"retention probe: error: --config {bad}: not valid YAML" in capsys.readouterr().err


def test_files_written_atomically_are_not_private(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from retention.io import atomic_path

    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))  # replaces the file it is given with a private one
    with atomic_path(tmp_path / "model", folder=True) as tmp:
        save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))
    for path in (tmp_path / "w.safetensors", tmp_path / "model" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


@pytest.mark.parametrize("flags, message", [
    (["--freeze.policy", "window", "--freeze.window", "-1"], "window=-1: must be >= 0"),
    (["--freeze.policy", "edited", "--edits.n_edit", "0", "--edits.n_control", "0"], "nothing is edited"),
])
def test_freeze_options_are_checked_before_any_model_is_loaded(config, flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(["--config", str(config), *flags])
