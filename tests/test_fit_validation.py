"""`retention fit` checks every option it can before a model is loaded (editor name and hyperparameters, layers
against the model's config, freeze and adapter layers, protocols, sizes), and config files with parents merge
group mappings key by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retention.commands.fit import main
from retention.fitting import resolve_config

BASE = ["--model.model_name", "tiny-llama", "--edits.n_edit", "2", "--edits.known_protocol", "none",
        "--edits.hparams", "{layer: 0}", "--run.wandb", "disabled"]


@pytest.mark.parametrize("flags, message", [
    (["--edits.editor", "bogus"], "unknown editor 'bogus'"),
    (["--edits.editor", "rome", "--edits.hparams", "{layer: 7}"], r"edits.hparams layers: \[7\] out of range"),
    (["--edits.editor", "memit", "--edits.hparams", "{layers: [0, 5]}"], r"\[5\] out of range for tiny-llama"),
    (["--freeze.policy", "list", "--freeze.layers", "[3]"], r"freeze.layers: \[3\] out of range"),
    (["--model.adapter.method", "lora", "--model.adapter.target_layers", "[-3]"], "target_layers"),
    (["--edits.known_protocol", "top2"], "unknown protocol"),
    (["--edits.max_candidates", "1"], "max_candidates=1 cannot give"),
    (["--edits.editor", "rome", "--edits.hparams", "{no_such_field: 1}"], "no_such_field"),
    (["--edits.editor", "rome", "--edits.hparams", "{layer: 0, mom2_corpus: [/no/such/corpus.txt, '$NO_SUCH_VAR/x']}"],
     "mom2_corpus: no corpus it names can be read here"),
])
def test_bad_options_fail_before_any_model_is_loaded(tmp_path, monkeypatch, flags, message):
    import retention.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(retention.models, "load_model", no_loading)
    monkeypatch.setattr("retention.modules.finetune.load_model", no_loading)
    argv = [*BASE, "--run.out_dir", str(tmp_path), "--run.name", "x", *flags]
    with pytest.raises(Exception, match=message):
        resolve_config(argv)
    with pytest.raises(Exception, match=message):
        main(argv)
    assert not (tmp_path / "x").exists()


def test_a_child_config_merges_group_mappings_over_its_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump({
        "model": {"model_name": "tiny-llama"}, "trainer": {"max_steps": 7, "accelerator": "cpu"},
        "run": {"name": "parent", "out_dir": "elsewhere", "wandb": "disabled", "validate_first": False},
    }))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "child.yaml").write_text("config: ../parent.yaml\nrun: {name: child}\ntrainer: {max_steps: 3}\n")
    (sub / "grandchild.yaml").write_text("config: child.yaml\nrun: {tags: [a]}\n")
    config = resolve_config(["--config", str(sub / "grandchild.yaml")])
    assert config["run"]["name"] == "child" and config["run"]["tags"] == ["a"]
    assert config["run"]["out_dir"] == "elsewhere" and config["run"]["wandb"] == "disabled"
    assert config["run"]["validate_first"] is False
    assert config["trainer"]["max_steps"] == 3 and config["trainer"]["accelerator"] == "cpu"


def test_config_files_that_include_each_other_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\n")
    with pytest.raises(ValueError, match="include each other"):
        resolve_config(["--config", str(Path(tmp_path / "a.yaml"))])


@pytest.mark.parametrize("trainer_kwargs, description", [
    ({"max_steps": 3}, "Epoch 0"),  # step-bounded: max_epochs -1, Lightning's own bar reads "Epoch 0/-2"
    ({"max_epochs": 3, "limit_train_batches": 1}, "Epoch 0/2"),
])
def test_the_progress_bar_of_a_step_bounded_run_has_no_negative_epoch_total(trainer_kwargs, description):
    """The description is set through Lightning's public hooks (no override of its private methods)."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from retention.runlog import StepProgressBar

    assert not [name for name in vars(StepProgressBar) if name.startswith("_get")]
    seen = []

    class Seen(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(bar.progress.tasks[bar.train_progress_bar_id].description)

    bar = StepProgressBar()
    trainer = Trainer(callbacks=[bar, Seen()], accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(BoringModel())
    assert seen and seen[0].split("]")[-1].strip() == description


def test_fit_adds_the_step_progress_bar(tmp_path, monkeypatch):
    """`retention fit` replaces Lightning's default bar (a bar of your own, or none, is kept)."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    import retention.fitting as fit
    from retention.runlog import StepProgressBar

    seen = {}

    def stop(self):
        seen["bars"] = [type(c).__name__ for c in self.trainer.callbacks if "ProgressBar" in type(c).__name__]
        raise KeyboardInterrupt

    monkeypatch.setattr(fit.FitCLI, "before_fit", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--model.model_name", "tiny-llama", "--run.wandb", "disabled", "--run.out_dir", str(tmp_path)])
    assert seen["bars"] == ([StepProgressBar.__name__] if _RICH_AVAILABLE else ["TQDMProgressBar"])


def test_remedy_groups_that_do_nothing_leave_the_resolved_config_and_its_digest_alone():
    from retention.fitting import resolve_config

    plain = resolve_config(["--config", "configs/demo.yaml"])
    off = resolve_config(["--config", "configs/demo.yaml", "--rehearsal.rate", "0", "--anchor.method", "l2",
                          "--anchor.strength", "0", "--after.mode", "none"])
    assert plain == off and not {"rehearsal", "anchor", "after"} & set(plain)
    on = resolve_config(["--config", "configs/demo.yaml", "--rehearsal.rate", "0.25", "--after.mode", "reedit"])
    assert on["rehearsal"]["rate"] == 0.25 and on["after"] == {"mode": "reedit"}
