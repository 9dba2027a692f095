"""`retention fit` and `retention study`: a user error is one line on stderr and exit status 2, before any model
is loaded or run folder made; `--debug` shows the traceback; an error after the work began is one line and exit
1; `retention` alone prints usage and exits 2. `--optimizer`/`--lr_scheduler` replace AdamW and its schedule."""

from __future__ import annotations

import pytest
import torch
import yaml

from retention.cli import main

BASE = {"model": {"model_name": "tiny-llama"}, "trainer": {"accelerator": "cpu", "max_steps": 1},
        "edits": {"knowledge": "builtin", "n_edit": 2, "known_protocol": "none", "editor": "rome",
                  "hparams": {"layer": 0}}}


@pytest.fixture
def config(tmp_path, monkeypatch):
    import retention.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(retention.models, "load_model", no_loading)
    monkeypatch.setattr("retention.modules.finetune.load_model", no_loading)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "run": {"out_dir": str(tmp_path / "runs"), "name": "x",
                                                    "wandb": "disabled"}}))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--edits.editor", "memt"], "--edits.editor: unknown editor 'memt'; choose from rome"),
    (["--edits.knowledge", "/no/such/facts.jsonl"], "--edits.knowledge /no/such/facts.jsonl: no such file"),
    (["--edits.known_protocol", "topl"], "--edits.known_protocol: unknown protocol(s) topl"),
    (["--monitor.protocols", "[top1, bogus]"], "--monitor.protocols: unknown protocol(s) bogus"),
    (["--data.task.source", "/no/such/task.jsonl"], "--data.task.source /no/such/task.jsonl: no such file"),
    (["--optimizer", "SGD", "--optimizer.lr", "0"], "--optimizer.lr must be a positive finite number, got 0.0"),
    (["--model.optimizer.lr", "-1"], "--model.optimizer.lr must be a positive finite number, got -1.0"),
    (["--model.model_name", "tiny-lama"], "--model.model_name: model 'tiny-lama' not found"),
])
def test_a_user_error_of_fit_is_one_line_and_exit_2_before_any_work(config, capsys, flags, message):
    assert main(["fit", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"retention fit: error: {err[-1].split('error: ', 1)[1]}" and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (config.parent / "runs").exists()


def test_a_parse_error_of_fit_is_one_line_without_the_usage(config, capsys):
    assert main(["fit", "--config", str(config), "--freeze.policy", "sideways"]) == 2
    err = capsys.readouterr().err
    assert err.startswith('retention fit: error: Parser key "freeze.policy": Expected a typing.Literal[')
    assert err.count("\n") == 1 and "usage" not in err


def test_debug_shows_the_traceback(config):
    with pytest.raises(ValueError, match="unknown editor 'memt'"):
        main(["fit", "--config", str(config), "--edits.editor", "memt", "--debug"])


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    assert main(["fit", "-c", str(bad)]) == 2
    assert f"retention fit: error: --config {bad.resolve()}: not valid YAML" in capsys.readouterr().err


def test_abbreviated_flags_are_refused_by_fit_and_study(config, tmp_path, capsys):
    assert main(["fit", "--config", str(config), "--trainer.max_step", "5"]) == 2
    assert capsys.readouterr().err == "retention fit: error: unrecognized arguments: --trainer.max_step 5\n"
    with pytest.raises(SystemExit) as exit_:
        main(["study", "-c", str(tmp_path / "s.yaml"), "--dry_ru", "true"])
    assert exit_.value.code == 2


def test_an_error_after_the_work_began_is_one_line_exit_1_and_leaves_no_folder(config, capsys, monkeypatch):
    import retention.fitting

    def boom(self, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(retention.fitting.FitCLI, "fit", boom)
    assert main(["fit", "--config", str(config), "--run.validate_first", "false"]) == 1
    err = capsys.readouterr().err
    assert "retention fit: error: RuntimeError: out of memory\n(--debug shows the traceback)" in err
    assert "Traceback" not in err
    assert not (config.parent / "runs" / "x").exists()  # a fresh run that failed before its first step


def test_retention_alone_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: retention") and "give a command" in err


def test_a_typo_in_a_study_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": {}, "seedz": [0], "out_dir": str(tmp_path / "o")}))
    assert main(["study", "-c", str(tmp_path / "s.yaml")]) == 2
    assert capsys.readouterr().err.strip().endswith("field 'seedz': unknown field; the fields are arms, base, "
                                                    "baseline, grid, name, out_dir, protocol, seed_keys, seeds, set")
    assert not (tmp_path / "o").exists()


def test_the_optimizer_and_scheduler_are_lightning_cli_options(config, monkeypatch):
    import retention.fitting

    seen = {}

    def stop(self):
        seen["optimizer"], seen["lr_scheduler"] = self.model.optimizer_init, self.model.lr_scheduler_init
        raise KeyboardInterrupt

    monkeypatch.setattr(retention.fitting.FitCLI, "before_fit", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["fit", "--config", str(config), "--optimizer", "SGD", "--optimizer.lr", "0.01",
              "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "5"])
    assert seen["optimizer"]["class_path"] == "torch.optim.SGD" and seen["optimizer"]["init_args"]["lr"] == 0.01
    assert seen["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"


def test_without_optimizer_flags_the_resolved_config_is_what_it_was(config):
    """Unset, ``optimizer`` and ``lr_scheduler`` are left out of the resolved config: its digests (resumes,
    studies) stay those of the runs made before the flags existed."""
    from retention.fitting import resolve_config

    resolved = resolve_config(["--config", str(config)])
    assert "optimizer" not in resolved and "lr_scheduler" not in resolved
    assert "optimizer" in resolve_config(["--config", str(config), "--optimizer", "SGD", "--optimizer.lr", "0.1"])


def _module(**optimizer):
    from torch import nn

    from retention.modules.finetune import FineTuneModule, OptimizerArgs

    module = FineTuneModule("tiny-llama", optimizer=OptimizerArgs(lr=0.5, warmup_steps=2, schedule="constant"))
    module.model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    for key, value in optimizer.items():
        setattr(module, key, value)
    return module


def test_a_given_optimizer_trains_under_our_warmup_unless_a_scheduler_is_given():
    default = _module().configure_optimizers()
    assert isinstance(default["optimizer"], torch.optim.AdamW)
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}
    out = _module(optimizer_init=sgd).configure_optimizers()
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01 / 2] * 2  # warmup step 1 of 2
    step = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 5}}
    out = _module(optimizer_init=sgd, lr_scheduler_init=step).configure_optimizers()
    assert isinstance(out["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert out["lr_scheduler"]["interval"] == "step" and out["optimizer"].param_groups[0]["lr"] == 0.01


def test_print_config_with_comments(config, capsys):
    pytest.importorskip("ruamel.yaml", reason="--print_config=comments needs ruamel.yaml (jsonargparse[ruamel])")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config=comments"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "# Run folder name under ``out_dir``" in out and yaml.safe_load(out)["run"]["name"] == "x"


@pytest.mark.parametrize("print_config", [["--print_config"], ["--print_config=skip_null"],
                                          ["--print_config", "skip_null"]])
def test_print_config_checks_the_choices_too(config, capsys, print_config):
    assert main(["fit", "--config", str(config), "--monitor.protocols", "[top1, bogus]", *print_config]) == 2
    assert "--monitor.protocols: unknown protocol(s) bogus" in capsys.readouterr().err


def test_without_print_config():
    from retention.fitting import without_print_config

    args = ["-c", "x.yaml", "--print_config", "comments,skip_null", "--run.name", "skip_null"]
    assert without_print_config(args) == ["-c", "x.yaml", "--run.name", "skip_null"]
    assert without_print_config(["--print_config=comments", "-c", "x"]) == ["-c", "x"]
    assert without_print_config(["--print_config", "-c", "x"]) == ["-c", "x"]
