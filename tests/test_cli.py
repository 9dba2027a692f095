"""The console script: one parser, ``-c/--print_config`` round trips, choices checked at parse time (before any
model is loaded), ``retention probe`` in process."""

import json
import subprocess
import sys

import pytest

import retention
from retention.cli import main


def test_unknown_command_lists_the_commands(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and "probe" in err and "fit" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.split() == ["retention", retention.__version__]


def test_python_dash_m_runs_the_same_script():
    out = subprocess.run([sys.executable, "-m", "retention", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["retention", retention.__version__]


@pytest.mark.parametrize("command,flag,text", [
    ("probe", "--protocols", "top1, prob, token_acc, gen"),
    ("probe", "--targets {true,new,both}", "counterfactual"),
    ("edit", "--editor", "import path of an Editor subclass"),
    ("edit", "--mode {batch,sequential,single}", "one after another"),
    ("edit", "--n N", "after --select_known"),
    ("edit", "--dtype {float32,bfloat16,float16}", "edits.precomputed"),
    ("locate", "--k", "contiguous"),
    ("locate", "--device DEVICE", "cuda:i"),
    ("report", "--print_config", "folders"),
])
def test_help_shows_choices_and_the_attribute_docstrings(capsys, command, flag, text):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert flag in out and text in out
    assert "-c CONFIG, --config CONFIG" in out


def test_no_help_text_names_a_dashed_flag(capsys):
    for command in ("probe", "edit", "locate", "study", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--select-known" not in out and "--batch-size" not in out, command


@pytest.mark.parametrize("argv,expected", [
    (["probe", "--model", "tiny-llama", "--protocols", "top1,gen", "--targets", "both", "--limit", "3"],
     {"protocols": ["top1", "gen"], "targets": "both", "limit": 3}),
    (["edit", "--model", "tiny-llama", "--mode", "batch", "--set", "{layer: 0, v_steps: 2}", "--dtype", "bfloat16"],
     {"mode": "batch", "set": {"layer": 0, "v_steps": 2}, "dtype": "bfloat16"}),
    (["locate", "--kinds", "hidden,attn", "--known", "none", "--device", "cpu"],
     {"kinds": ["hidden", "attn"], "known": "none", "device": "cpu"}),
    (["report", "runs/a", "runs/b", "--out", "rep"], {"folders": ["runs/a", "runs/b"], "out": "rep"}),
])
def test_print_config_round_trips_through_dash_c(tmp_path, capsys, argv, expected):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed).items() >= expected.items()
    config = tmp_path / "args.yaml"
    config.write_text(printed)
    with pytest.raises(SystemExit):
        main([argv[0], "-c", str(config), "--print_config"])
    assert capsys.readouterr().out == printed
    # Later flags override the file.
    with pytest.raises(SystemExit):
        main([argv[0], "--config", str(config), "--out", "elsewhere", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["out"] == "elsewhere"


@pytest.mark.parametrize("argv,key,value", [
    (["edit", "--mode", "bogus"], "mode", "bogus"),
    (["edit", "--select_known", "top2"], "select_known", "top2"),
    (["edit", "--on_error", "ignore"], "on_error", "ignore"),
    (["edit", "--dtype", "float64"], "dtype", "float64"),
    (["edit", "--n", "0"], "n", "0"),
    (["edit", "--device", "gpu"], "device", "gpu"),
    (["probe", "--targets", "old"], "targets", "old"),
    (["probe", "--protocols", "top1,gen2"], "protocols", "gen2"),
    (["probe", "--probes", "neighbourhood"], "probes", "neighbourhood"),
    (["locate", "--kinds", "hidden,resid"], "kinds", "resid"),
    (["locate", "--known", "maybe"], "known", "maybe"),
    (["study", "-c", "x.yaml", "--jobs", "0"], "jobs", "0"),
])
def test_a_bad_choice_fails_at_parse_time_naming_the_option(capsys, argv, key, value):
    # The model does not exist: reaching the model load would fail differently.
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], "--model", "no-such-model", *argv[1:]] if argv[0] != "study" else argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f'key "{key}"' in err and value in err


def test_edit_checks_editor_hparams_and_device_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import torch

    base = ["edit", "--model", "no-such-model", "--out", str(tmp_path / "out")]
    assert main([*base, "--editor", "nope"]) == 2
    assert "--editor: unknown editor 'nope'" in capsys.readouterr().err
    assert main([*base, "--editor", "retention.models.ModelNotFound"]) == 2
    assert "--editor: editor 'retention.models.ModelNotFound' is not a subclass" in capsys.readouterr().err
    assert main([*base, "--hparams", str(tmp_path / "missing.yaml")]) == 2
    assert f"--hparams {tmp_path / 'missing.yaml'}: no such file" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--device", "cuda:1"]) == 2
    assert "--device: device 'cuda:1': no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_probe_prints_the_known_table_and_writes_every_probe(tmp_path, capsys):
    out = tmp_path / "probes.jsonl"
    assert main(["probe", "--model", "tiny-llama", "--data", "builtin", "--limit", "6",
                 "--protocols", "top1,prob", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ALL" in printed and "top1" in printed and "prob" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert all(set(r["passed"]) == {"top1", "prob"} and r["targets"] == "true" and r["kind"] == "known"
               for r in rows)


def test_probe_targets_new_and_both(tmp_path, capsys):
    from retention.data.readers import read_records

    records, _ = read_records("builtin", limit=4)
    true_of = {str(r.case_id): (r.target_true, r.target_new) for r in records}
    base = ["probe", "--model", "tiny-llama", "--limit", "4", "--protocols", "top1,prob", "--device", "cpu"]
    assert main([*base, "--targets", "new", "--out", str(tmp_path / "new.jsonl")]) == 0
    new = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert len(new) == 4 and {r["kind"] for r in new} == {"new"} and {r["targets"] for r in new} == {"new"}
    assert all((r["target"], r["alternative"]) == true_of[r["case_id"]][::-1] for r in new)
    capsys.readouterr()

    assert main([*base, "--targets", "both", "--out", str(tmp_path / "both.jsonl")]) == 0
    header = capsys.readouterr().out.split("ALL")[0]
    assert all(col in header for col in ("top1 true", "top1 new", "prob true", "prob new"))
    both = [json.loads(line) for line in (tmp_path / "both.jsonl").read_text().splitlines()]
    true = {r["case_id"]: r for r in both if r["targets"] == "true"}
    assert len(true) == 4 and [r for r in both if r["targets"] == "new"] == new
    for r in new:  # the same two continuations scored, with their roles swapped
        t = true[r["case_id"]]
        assert r["target_logprob"] == pytest.approx(t["alt_logprob"], abs=1e-5)
        assert r["alt_logprob"] == pytest.approx(t["target_logprob"], abs=1e-5)
        assert r["passed"]["prob"] != t["passed"]["prob"]


def test_probe_with_nothing_to_score_exits_2_before_loading_a_model(tmp_path, capsys):
    assert main(["probe", "--model", "tiny-llama", "--limit", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "nothing to score: 0 record(s)" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
