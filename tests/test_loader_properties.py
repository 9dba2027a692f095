"""Property tests of the loaders of files a run or a study leaves behind: the study file parser, the report's
folder reader and the checkpoint loader. Any bytes, and any structure of the right container type, give a result
or one of the project's errors naming the file — never another exception, and never code run from the file."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_reader_properties import EDGES, json_values, raw_inputs

from retention.callbacks.checkpoint import CheckpointError, load_checkpoint
from retention.study.report import ReportError, aggregate, load_results
from retention.study.spec import StudyError, StudySpec

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
FIELDS = ["name", "base", "set", "grid", "arms", "baseline", "seeds", "seed_keys", "protocol", "out_dir"]
study_dicts = st.fixed_dictionaries({}, optional={k: yaml_values for k in FIELDS})


def read_or_named(read, path: Path, error: type[Exception]) -> None:
    """``read(path)`` returns, or raises ``error`` naming ``path``; any other exception fails the test."""
    try:
        read(path)
    except error as err:
        assert str(path) in str(err)


def with_edges(test):
    for data in EDGES:
        test = example(data=data)(test)
    return test


# -- the study file ------------------------------------------------------------------------------------------------


@FUZZ
@given(data=raw_inputs)
@with_edges
def test_any_study_file_parses_or_is_a_study_error_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("study") / "s.yaml"
    path.write_bytes(data)
    read_or_named(StudySpec.from_file, path, StudyError)


@FUZZ
@given(spec=study_dicts)
def test_any_study_mapping_parses_or_is_a_study_error_naming_the_file(tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("study")
    (folder / "base.yaml").write_text("trainer: {max_steps: 1}\n")
    spec.setdefault("base", "base.yaml")
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    read_or_named(StudySpec.from_file, path, StudyError)


# -- the report's folder reader ------------------------------------------------------------------------------------


def _report_reads(folder: Path) -> None:
    results, _, _ = load_results([folder])
    aggregate(results)


def _read_or_named(tmp_path_factory, name: str, data: bytes) -> None:
    """A folder holding only ``name`` with ``data``, read as the report reads it: runs, or a ReportError naming the
    folder."""
    folder = tmp_path_factory.mktemp("folder")
    (folder / name).write_bytes(data)
    read_or_named(_report_reads, folder, ReportError)


@pytest.mark.parametrize("name", ["summary.json", "study.json"])
@FUZZ
@given(data=raw_inputs)
@with_edges
def test_any_run_or_study_file_is_read_or_a_report_error_naming_the_folder(tmp_path_factory, name, data):
    """``raw_inputs`` holds arbitrary bytes and text and JSON documents of any structure."""
    _read_or_named(tmp_path_factory, name, data)


# -- the checkpoint loader -----------------------------------------------------------------------------------------


class Marker:
    """Unpickling it would create ``path`` (with ``open``): any structure holding it must be refused."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _check_load(path: Path, marker: Path) -> None:
    read_or_named(load_checkpoint, path, CheckpointError)  # its result is a dict whenever it returns
    assert not marker.exists()


@FUZZ
@given(data=raw_inputs | st.binary(min_size=200, max_size=2000))
@with_edges
def test_any_bytes_load_as_a_checkpoint_or_a_checkpoint_error_naming_the_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    path.write_bytes(data)
    _check_load(path, path.with_name("PWNED"))


@FUZZ
@given(value=json_values, cut=st.integers(0, 400), flip=st.integers(0, 10_000))
def test_any_saved_structure_truncated_or_altered_loads_or_is_named(tmp_path_factory, value, cut, flip):
    folder = tmp_path_factory.mktemp("ckpt")
    marker = folder / "PWNED"
    data = bytearray(_torch_bytes({"global_step": 1, "value": value, "hook": Marker(str(marker)) if cut % 2 else 0}))
    if cut:
        data = data[:-cut] if cut < len(data) else data[:1]
    if flip and data:
        data[flip % len(data)] ^= 0xFF
    path = folder / "last.ckpt"
    path.write_bytes(bytes(data))
    _check_load(path, marker)


@FUZZ
@given(value=json_values)
def test_a_pickled_structure_of_plain_values_loads(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    path.write_bytes(_torch_bytes({"global_step": 1, "value": value}))
    assert json.dumps(load_checkpoint(path)["value"]) == json.dumps(value)  # NaN is not equal to itself


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded") / "last.ckpt"
    dcp.save({"w": torch.ones(3), "step": 5, "groups": [{"lr": 0.1}]}, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 3, "epoch": 0}, folder / "meta.pt")
    return folder


@FUZZ
@given(which=st.sampled_from([".metadata", "__0_0.distcp", "meta.pt"]), data=raw_inputs,
       keep=st.integers(0, 4000), pickled=json_values)
def test_any_file_of_a_sharded_checkpoint_damaged_is_named(sharded, tmp_path_factory, which, data, keep, pickled):
    """One file of a sharded folder replaced: by arbitrary bytes, by its own bytes cut short, or (the index) by a
    pickle of an arbitrary structure."""
    folder = tmp_path_factory.mktemp("copy") / "last.ckpt"
    shutil.copytree(sharded, folder)
    original = (sharded / which).read_bytes()
    replacement = [data, original[:keep], pickle.dumps(pickled)][keep % 3 if which == ".metadata" else keep % 2]
    (folder / which).write_bytes(replacement)
    read_or_named(load_checkpoint, folder, CheckpointError)
