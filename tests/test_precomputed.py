"""An edit made earlier instead of on every rank: `edits.precomputed` (a `retention edit` folder) and
`edits.edited_model` (an edited model and its facts) give the numbers of the run that makes the same edit itself."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_runs import N_CONTROL, N_EDIT, RATES, ROME, fit_config, read_run

from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.augmentation import ParaphraseAugmentation
from retention.commands.edit import EditArgs, run
from retention.data.readers import load_records
from retention.data.selection import split_edit_control
from retention.models import model_fingerprint
from retention.pipeline_contract import PipelineState


@pytest.mark.parametrize("seed", range(8))
def test_controls_drawn_for_a_given_edit_set_are_the_splits(seed):
    records = load_records("builtin")
    edit, control = split_edit_control(records, 5, 12, seed)
    assert split_edit_control(records, 0, 12, seed, edit=edit) == (edit, control)


@pytest.fixture(scope="module")
def edit_folder(one_rank) -> Path:
    """`retention edit` of the facts the 1-rank run edits (its seeded split; its edits use no augmentation), with
    the run's ROME hyperparameters and the edited model saved."""
    config, _ = one_rank
    root = config.parent
    edit, _ = split_edit_control(load_records("builtin"), N_EDIT, N_CONTROL, seed=0)
    facts = root / "to_edit.jsonl"
    facts.write_text("".join(json.dumps(dataclasses.replace(r, augmentations=[]).to_dict()) + "\n" for r in edit),
                     encoding="utf-8")
    hparams = root / "rome.yaml"
    hparams.write_text(yaml.safe_dump(ROME), encoding="utf-8")
    out = root / "edit"
    run(EditArgs(model=str(root / "model"), editor="rome", hparams=str(hparams), data=str(facts), n=N_EDIT,
                 mode="batch", select_known="none", out=str(out)))
    return out


def _run(root: Path, name: str, trainer: dict | None = None, **edits) -> dict:
    """The tiny run with these ``edits`` options (None removes one): in-process, or on 2 DDP ranks when
    ``trainer`` sets devices."""
    from retention.commands.fit import main

    config = fit_config(root, name, **(trainer or {}))
    config["edits"] = {k: v for k, v in {**config["edits"], "cache": False, **edits}.items() if v is not None}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    if trainer is None:
        assert main(["--config", str(path)]) == 0
    else:
        proc = subprocess.run([sys.executable, "-m", "retention", "fit", "--config", str(path)], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_run(root / "runs" / name)[0]


def _same_run(summary: dict, one: dict) -> None:
    for key in RATES:
        assert summary[key] == one[key], key
    for key in ("edit_case_ids", "control_case_ids", "edited_layers"):
        assert summary["run"][key] == one["run"][key], key


def test_edit_folder_holds_the_facts_and_the_edited_weights(edit_folder):
    facts = load_records(edit_folder / "facts.jsonl")
    assert [r.augmentations for r in facts] == [[]] * N_EDIT
    weights = load_file(str(edit_folder / "edited_weights.safetensors"))
    model = load_file(str(edit_folder / "model" / "model.safetensors"))
    assert list(weights) == ["model.layers.0.mlp.down_proj.weight"]
    assert all(torch.equal(w, model[n]) for n, w in weights.items())
    assert json.loads((edit_folder / "scores.json").read_text())["base_fingerprint"]


def test_precomputed_edit_gives_the_run_that_edits(one_rank, edit_folder):
    config, folder = one_rank
    one, _ = read_run(folder)
    pre = _run(config.parent, "precomputed", precomputed=str(edit_folder), hparams=None)
    _same_run(pre, one)
    assert pre["run"]["precomputed"] == str(edit_folder) and pre["run"]["hparams"]["layer"] == 0
    no_seconds = [[{k: v for k, v in d.items() if k != "seconds"} for d in s["run"]["edit_diagnostics"]]
                  for s in (pre, one)]
    assert no_seconds[0] == no_seconds[1]


def test_precomputed_edit_on_two_ddp_ranks(one_rank, edit_folder):
    """Every rank loads the same edit: the numbers of the 1-rank run that edits."""
    config, folder = one_rank
    two = _run(config.parent, "precomputed_ddp", {"devices": 2, "strategy": "ddp"}, precomputed=str(edit_folder),
               hparams=None)
    _same_run(two, read_run(folder)[0])


def test_edited_model_and_its_facts_give_the_run_that_edits(one_rank, edit_folder):
    config, folder = one_rank
    one, _ = read_run(folder)
    summary = _run(config.parent, "edited_model", edited_model=str(edit_folder / "model"),
                   knowledge=str(edit_folder / "facts.jsonl"), controls="builtin", n_edit=0, hparams=None)
    _same_run(summary, one)
    assert summary["run"]["editor"] is None and summary["run"]["edited_model"] == str(edit_folder / "model")


def test_precomputed_edit_of_another_base_model_is_refused(edit_folder, tiny_llama):
    edits = ApplyEdits(precomputed=str(edit_folder), n_control=1)
    model = SimpleNamespace(model=tiny_llama[0])
    with pytest.raises(ValueError, match="edited another base model"):
        edits.source.apply(model, edits.source.edit_set, model_fingerprint(tiny_llama[0]))


def test_edited_model_identical_to_the_base_is_refused(one_rank, tmp_path):
    config, _ = one_rank
    model = config.parent / "model"
    edits = ApplyEdits(edited_model=str(model), knowledge="builtin")
    from retention.models import load_model

    base = load_model(str(model))[0]
    with pytest.raises(ValueError, match="no weight differs from the base model's"):
        edits.source.apply(SimpleNamespace(model=base), edits.source.edit_set, model_fingerprint(base))


def test_options_of_an_earlier_edit_are_checked_at_construction(edit_folder, tmp_path):
    single = tmp_path / "single"
    (single / "edits").mkdir(parents=True)
    partial = tmp_path / "partial"
    shutil.copytree(edit_folder, partial)
    (partial / "facts.jsonl").unlink()
    memory = tmp_path / "memory"  # what `retention edit` writes for GRACE or WISE
    shutil.copytree(edit_folder, memory, ignore=shutil.ignore_patterns("facts.jsonl", "edited_weights*", "model"))
    (memory / "edit" / "memory.safetensors").write_bytes(b"")
    scores = json.loads((memory / "scores.json").read_text(encoding="utf-8"))
    (memory / "scores.json").write_text(json.dumps({**scores, "editor": "grace"}), encoding="utf-8")
    cases = [
        (dict(precomputed=str(tmp_path / "nowhere")), "precomputed .* is not a folder"),
        (dict(precomputed=str(single)), "single-mode edit"),
        (dict(precomputed=str(partial)), "has no facts.jsonl"),
        (dict(precomputed=str(memory)), "kept in a memory module .*grace.*edits.editor: grace"),
        (dict(precomputed=str(edit_folder), editor="memit"), "is a rome edit, but editor is 'memit'"),
        (dict(precomputed=str(edit_folder), hparams="smollm2-135m"), "hparams is set, but precomputed"),
        (dict(precomputed=str(edit_folder), mode="sequential"), "edited in batch mode, but mode is 'sequential'"),
        (dict(precomputed=str(edit_folder), n_edit=2), "n_edit=2, but precomputed gives 3 edited facts"),
        (dict(precomputed=str(edit_folder), mode="single", single_index=0, n_edit=3), "mode .single."),
        (dict(precomputed=str(edit_folder), edited_model=str(edit_folder / "model")), "set one"),
        (dict(controls="builtin"), "controls is only for edited_model"),
        (dict(edited_model=str(tmp_path)), "not a model folder with safetensors"),
        (dict(edited_model=str(edit_folder / "model"), knowledge=str(edit_folder / "facts.jsonl"), n_control=2),
         "needs controls"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            ApplyEdits(**options)
    edits = ApplyEdits(precomputed=str(edit_folder), n_control=2)
    assert edits.n_edit == N_EDIT and edits.active and edits.editor_layers("x") == [0]


def test_edited_model_without_controls_keeps_only_the_given_facts(edit_folder):
    edits = ApplyEdits(edited_model=str(edit_folder / "model"), knowledge=str(edit_folder / "facts.jsonl"))
    selection = edits.select(SimpleNamespace())  # nothing to score: no model needed
    sets = selection.sets
    assert [r.case_id for r in sets.edit] == [r.case_id for r in edits.source.edit_set] and sets.control == []
    assert selection.stats["read_records"] == N_EDIT


def test_augmentation_with_an_earlier_edit_is_refused(edit_folder, tiny_llama):
    edits = ApplyEdits(precomputed=str(edit_folder), n_control=1, known_protocol="none", cache=False)
    trainer = SimpleNamespace(callbacks=[edits, ParaphraseAugmentation(k=2)], datamodule=None)
    with pytest.raises(ValueError, match="paraphrases.k: .* edits.precomputed gives an edit already made"):
        edits.on_base_model_ready(trainer, SimpleNamespace(model=tiny_llama[0], tokenizer=tiny_llama[1],
                                                           pipeline=PipelineState()))
