"""The console script: dispatch, ``--help`` text from the argument dataclasses, ``retention probe`` in process."""

import json

import pytest

from retention.cli import main


def test_unknown_command_lists_the_commands(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and "probe" in err and "fit" in err


@pytest.mark.parametrize("command,flag,text", [
    ("probe", "--protocols", "Comma-separated protocols"),
    ("edit", "--editor", "memit, alphaedit"),
    ("locate", "--k", "contiguous"),
])
def test_help_shows_the_attribute_docstrings(capsys, command, flag, text):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert flag in out and text in out


def test_probe_prints_the_known_table_and_writes_every_probe(tmp_path, capsys):
    out = tmp_path / "probes.jsonl"
    assert main(["probe", "--model", "tiny-llama", "--data", "builtin", "--limit", "6",
                 "--protocols", "top1,prob", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ALL" in printed and "top1" in printed and "prob" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert all(set(r["passed"]) == {"top1", "prob"} for r in rows)


def test_probe_rejects_an_unknown_protocol(tmp_path):
    with pytest.raises(ValueError, match="gen2"):
        main(["probe", "--model", "tiny-llama", "--limit", "2", "--protocols", "top1,gen2",
              "--out", str(tmp_path / "x.jsonl")])


def test_probe_with_nothing_to_score_exits_2_before_loading_a_model(tmp_path, capsys):
    assert main(["probe", "--model", "no-such-model", "--limit", "0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "nothing to score: 0 record(s)" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
