"""Loading never runs code: a checkpoint planted in a run folder, in a study's interrupted run or in a sharded
checkpoint folder (its index or a non-tensor value in a shard) is refused with an error naming the file, and
the file its payload would create never appears."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from tiny_runs import fit_config, prepare

from retention.callbacks.checkpoint import CheckpointError, load_checkpoint
from retention.cli import main as cli_main
from retention.commands.fit import main as fit_main


class Payload:
    """Unpickling it calls ``open(marker, "w")``: a harmless stand-in for ``os.system`` that leaves a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class SystemPayload:
    """The issue's payload: unpickling it runs ``touch <marker>`` in a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": Payload(marker), "epoch": 0}, path)
    return path


@pytest.fixture
def root(tmp_path, tiny_llama) -> Path:
    prepare(tmp_path, tiny_llama[1])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(fit_config(tmp_path, protocols=["top1", "prob"])))
    return tmp_path


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The payload is live: an unrestricted load creates the marker (what the tests below show refused)."""
    marker = tmp_path / "PWNED"
    torch.load(_plant(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_the_issues_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": SystemPayload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"last.ckpt: refused to load: .* \(posix\.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_fit_refuses_a_planted_checkpoint(root):
    marker = root / "PWNED"
    last = _plant(root / "runs" / "x" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="refused") as err:
        fit_main(["--config", str(root / "base.yaml"), "--run.name", "x", "--ckpt_path", "last"])
    assert str(last) in str(err.value) and "io.open" in str(err.value)
    assert not marker.exists()


def test_weights_only_false_is_refused(root):
    marker = root / "PWNED"
    _plant(root / "runs" / "x" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(ValueError, match="--weights_only false: retention fit loads checkpoints as tensors"):
        fit_main(["--config", str(root / "base.yaml"), "--run.name", "x", "--ckpt_path", "last",
                  "--weights_only", "false"])
    assert not marker.exists()


def test_lightning_loads_the_checkpoint_without_running_code_too(root, monkeypatch):
    """Lightning's own load (``trainer.fit`` restoring the checkpoint) is restricted as well, should the file
    change after ``retention fit`` read it."""
    import retention.fitting as fit

    marker = root / "PWNED"
    last = _plant(root / "runs" / "x" / "checkpoints" / "last.ckpt", marker)
    monkeypatch.setattr(fit, "resume_point", lambda run_dir, ckpt: (last, last, {"global_step": 0}))
    monkeypatch.setattr(fit, "check_resume", lambda *args, **kwargs: None)
    with pytest.raises(pickle.UnpicklingError, match="io.open"):
        fit_main(["--config", str(root / "base.yaml"), "--run.name", "x", "--ckpt_path", "last"])
    assert not marker.exists()


def test_a_study_refuses_an_interrupted_run_with_a_planted_checkpoint(root, capsys):
    study = {"name": "s", "base": "base.yaml", "out_dir": str(root / "studies")}
    (root / "s.yaml").write_text(yaml.safe_dump(study))
    marker = root / "PWNED"
    run = root / "studies" / "s" / "runs" / "baseline__seed0"
    last = _plant(run / "checkpoints" / "last.ckpt", marker)
    (run / "incomplete.json").write_text("{}")
    assert cli_main(["study", "--config", str(root / "s.yaml")]) == 1
    state = json.loads((root / "studies" / "s" / "study.json").read_text())
    error = state["runs"][0]["error"]
    assert state["runs"][0]["state"] == "failed"
    assert error.startswith("CheckpointError") and str(last) in error
    assert not marker.exists()


def _sharded(folder: Path, state: dict) -> Path:
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 3, "epoch": 0}, folder / "meta.pt")
    return folder


def test_a_sharded_checkpoint_of_tensors_and_plain_values_loads(tmp_path):
    folder = _sharded(tmp_path / "last.ckpt", {"w": torch.ones(2, 3), "step": 5, "groups": [{"lr": 0.1}]})
    assert load_checkpoint(folder)["global_step"] == 3


def test_a_sharded_checkpoint_with_a_planted_shard_value_is_refused(tmp_path):
    """torch.distributed.checkpoint reads a shard's non-tensor values with an unrestricted ``torch.load``."""
    marker = tmp_path / "PWNED"
    folder = _sharded(tmp_path / "last.ckpt", {"w": torch.ones(2), "hook": Payload(marker)})
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp.*hook.*refused"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_a_sharded_checkpoint_with_a_planted_index_is_refused(tmp_path):
    """The shard index (``.metadata``) is a plain pickle, which torch.distributed.checkpoint reads freely."""
    marker = tmp_path / "PWNED"
    folder = _sharded(tmp_path / "last.ckpt", {"w": torch.ones(2)})
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load: it names (builtins|io)\.open"):
        load_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x80\x04K\x01.", b"not a checkpoint"])
def test_a_damaged_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_a_truncated_real_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    buffer = io.BytesIO()
    torch.save({"global_step": 1, "w": torch.ones(100)}, buffer)
    path.write_bytes(buffer.getvalue()[:-200])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path)


def test_a_sharded_checkpoint_is_restored_from_the_copy_that_was_checked(tmp_path):
    """The folder is read once into a private copy, which is checked and restored from: a payload planted in the
    run folder after the check (a swap between check and restore) is never read."""
    from retention.callbacks.checkpoint import open_checkpoint

    marker = tmp_path / "PWNED"
    folder = _sharded(tmp_path / "last.ckpt", {"w": torch.ones(2), "step": 5})
    restore, meta = open_checkpoint(folder)
    assert meta["global_step"] == 3 and restore != folder and restore.stat().st_mode & 0o077 == 0
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "meta.pt").write_bytes(b"garbage")
    state = {"w": torch.zeros(2), "step": 0}
    dcp.load(state, checkpoint_id=restore, no_dist=True)
    assert torch.equal(state["w"], torch.ones(2)) and state["step"] == 5 and not marker.exists()


def test_a_checkpoint_file_is_restored_from_itself(tmp_path):
    from retention.callbacks.checkpoint import open_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 2}, path)
    assert open_checkpoint(path) == (path, {"global_step": 2})


def test_a_damaged_shard_names_the_checked_folder_not_the_copy(tmp_path):
    folder = _sharded(tmp_path / "last.ckpt", {"w": torch.ones(2), "step": 5})
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=rf"^{folder}/__0_0\.distcp"):
        load_checkpoint(folder)


def test_last_checkpoint_overrides_no_private_lightning_method():
    """It saves through public hooks and ``trainer.save_checkpoint`` (it used to override ModelCheckpoint's
    private ``_save_checkpoint``)."""
    from retention.callbacks.checkpoint import LastCheckpoint

    private = [name for name in vars(LastCheckpoint) if name.startswith("_") and not name.startswith("__")
               and any(hasattr(base, name) for base in LastCheckpoint.__mro__[1:])]
    assert private == []
