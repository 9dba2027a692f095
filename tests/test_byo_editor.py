"""An editor of your own (`tests/byo_editor.py`) by its import path, end to end: built with its hyperparameter
defaults, a mapping or a YAML file, and run through `retention fit` (the edits land, the edited layer is frozen,
retention is measured), with W&B offline: the whole resolved config goes to hparams.yaml and the W&B run
config, and the final table and the curves to W&B as a table and an image.

That an edit made elsewhere (`edits.precomputed`, `edits.edited_model` + `edits.knowledge`) gives the retention
table of the run that edits itself is tests/test_precomputed.py (`test_precomputed_edit_gives_the_run_that_edits`,
`test_edited_model_and_its_facts_give_the_run_that_edits`, on 1 rank and on 2 DDP ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_runs import N_CONTROL, N_EDIT, fit_config, prepare, read_run

from retention.callbacks.apply_edits import ApplyEdits
from retention.editing.registry import build_editor, editor_class, editor_hparams

ROOT = Path(__file__).resolve().parents[1]
BYO = "tests.byo_editor.RankOneEditor"


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def test_an_editor_class_path_builds_with_defaults_a_mapping_or_a_file(tmp_path):
    from tests.byo_editor import RankOneEditor, RankOneHParams

    assert editor_class(BYO) == (RankOneEditor, {}) and editor_class("tests.byo_editor:RankOneEditor")[0] is RankOneEditor
    editor = build_editor(BYO)  # no preset for an editor of your own: its class's defaults
    assert isinstance(editor, RankOneEditor) and editor.hparams == RankOneHParams()
    assert build_editor(BYO, {"strength": 2.0}, "smollm2-135m").hparams == RankOneHParams(strength=2.0)
    path = tmp_path / "byo.yaml"
    path.write_text("layer: 0\nstrength: 3\n")
    assert build_editor(BYO, str(path), layer=1).hparams == RankOneHParams(layer=1, strength=3.0)
    with pytest.raises(ValueError, match="unknown RankOneHParams field"):
        build_editor(BYO, {"v_steps": 3})
    edits = ApplyEdits(editor=BYO, hparams={"layer": 1}, n_edit=2)
    assert edits.editor_layers("tiny-llama") == [1]
    with pytest.raises(ValueError, match="cannot import 'Nope'"):
        ApplyEdits(editor="tests.byo_editor.Nope", n_edit=1)


def test_an_editor_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    """The `retention` script's sys.path holds its own folder, not the working directory (python -m adds it)."""
    (tmp_path / "my_editors.py").write_text("from tests.byo_editor import RankOneEditor as Mine\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert editor_class("my_editors.Mine")[0].__name__ == "RankOneEditor"
    assert str(tmp_path) not in __import__("sys").path  # found without changing the process's search path


def test_an_inline_mapping_overrides_only_its_fields_of_the_preset(tmp_path, monkeypatch):
    """`edits.hparams: {layer: 4}` (as `retention edit --set '{layer: 4}'`) keeps the preset's other fields."""
    (tmp_path / "wikitext").mkdir()  # the ROME preset's corpus, wikitext2, is checked wherever this runs
    (tmp_path / "wikitext" / "wiki.test.raw").write_text("text", encoding="utf-8")
    monkeypatch.setenv("RETENTION_DATA", str(tmp_path))
    preset = editor_hparams("rome", None, "smollm2-135m").to_dict()
    mapped = editor_hparams("rome", {"layer": 4}, "smollm2-135m").to_dict()
    assert mapped == {**preset, "layer": 4} and mapped["v_steps"] == preset["v_steps"] == 30
    assert build_editor("rome", None, "smollm2-135m", layer=4).hparams.to_dict() == mapped
    # Without a preset for the model, a mapping fills in the class defaults, as before.
    assert editor_hparams("rome", {"layer": 0}, "no-such-model").to_dict()["v_steps"] == 20


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory, tiny_llama):
    """The tiny pipeline run with the editor of our own (no hparams: its defaults edit the last layer), the edited
    layer frozen, W&B offline and its log_table / log_image calls recorded: (run folder, calls)."""
    from lightning.pytorch.loggers import WandbLogger

    from retention.commands.fit import main

    root = tmp_path_factory.mktemp("byo")
    prepare(root, tiny_llama[1])
    config = fit_config(root, "byo")
    config["edits"].update(editor=BYO, cache=False)
    config["edits"].pop("hparams")
    config["freeze"] = {"policy": "edited"}
    config["run"]["wandb"] = "offline"
    path = root / "byo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    calls: dict[str, list] = {"log_table": [], "log_image": [], "log_hyperparams": []}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(var, str(root / "wandb_home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in calls:
            original = getattr(WandbLogger, name)

            def record(self, *args, _name=name, _original=original, **kwargs):
                calls[_name].append((args, kwargs))
                return _original(self, *args, **kwargs)

            mp.setattr(WandbLogger, name, record)
        try:
            assert main(["--config", str(path)]) == 0
        finally:
            import wandb

            wandb.finish()
    return root / "runs" / "byo", calls


def test_fit_with_an_editor_of_your_own(byo_run):
    folder, _ = byo_run
    summary, _ = read_run(folder)
    run = summary["run"]
    assert run["editor"] == BYO and run["n_edit"] == N_EDIT and run["n_control"] == N_CONTROL
    assert run["hparams"] == {"max_relative_update": 10.0, "on_large_update": "error", "layer": None,
                              "strength": 1.0}  # resolved: the class's defaults
    assert run["edited_layers"] == [1] and run["frozen_layers"] == [1]  # freeze.policy edited: the editor's layer
    assert summary["t0"]["edit"]["top1"] == {"value": 1.0, "count": N_EDIT, "denominator": N_EDIT}  # edits landed
    for protocol in summary["protocols"]:
        kept = summary["retention"][protocol]["edit"]
        assert kept["denominator"] == summary["t0"]["edit"][protocol]["count"] and 0 <= kept["count"] <= N_EDIT
    assert summary["retention"]["top1"]["edit"]["denominator"] == N_EDIT  # retention measured on every edit


def test_the_whole_config_goes_to_hparams_yaml_and_wandb(byo_run):
    folder, calls = byo_run
    saved = yaml.safe_load((folder / "hparams.yaml").read_text())
    for group in ("model", "data", "trainer", "run", "edits", "paraphrases", "freeze", "monitor", "report"):
        assert group in saved, group
    assert saved["edits"]["editor"] == BYO and saved["edits"]["n_edit"] == N_EDIT
    assert saved["freeze"]["policy"] == "edited" and saved["trainer"]["max_steps"] == 3
    assert saved["model_name"] == saved["model"]["model_name"]  # the module's own hyperparameters stay
    logged = [args[0] for args, _ in calls["log_hyperparams"]]
    assert any(p.get("edits", {}).get("editor") == BYO and p["freeze"]["policy"] == "edited" for p in logged)
    wandb_config = next(folder.glob("wandb/offline-run-*/files/config.yaml"), None)
    if wandb_config is not None:  # written when the offline run closes
        assert "freeze" in yaml.safe_load(wandb_config.read_text())


def test_the_final_table_and_the_curves_go_to_wandb(byo_run):
    from retention.callbacks.report import TABLE_COLUMNS, table_rows

    folder, calls = byo_run
    summary = json.loads((folder / "summary.json").read_text())
    ((args, kwargs),) = calls["log_table"]
    assert kwargs["key"] == "retention/table" and kwargs["columns"] == TABLE_COLUMNS
    rows = kwargs["data"]
    assert rows == table_rows(summary) and len(rows) == len(summary["protocols"]) * len(summary["retention"]["top1"])
    for protocol, group, value, kept, passing, accuracy, probes in rows:
        rate, t0 = summary["retention"][protocol][group], summary["t0"][group][protocol]
        assert (kept, passing, probes) == (rate["count"], rate["denominator"], t0["denominator"])
        assert value == (None if rate["denominator"] == 0 else rate["value"]) and accuracy == t0["value"]
    ((args, kwargs),) = calls["log_image"]
    assert kwargs["key"] == "retention/curves" and kwargs["images"] == [str(folder / "retention_curves.png")]
