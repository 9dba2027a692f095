import json

import pytest
import torch
from safetensors.torch import load_file

from retention.commands.edit import EditArgs, main, run
from retention.commands.options import UsageError
from retention.data.edit_folder import read_edit_folder
from retention.data.readers import RecordError
from retention.editing.base import EditResult
from retention.records import KnowledgeRecord, NeighborhoodPrompt


@pytest.fixture
def records(tmp_path, tiny_llama):
    recs = [
        KnowledgeRecord("7", "Danielle Darrieux", "The mother tongue of {} is", "P103", "English", "French",
                        paraphrases=["Danielle Darrieux grew up speaking"],
                        neighborhood=[NeighborhoodPrompt("The mother tongue of Léon Blum is", "French")]),
        KnowledgeRecord("8", "Toko Yasuda", "{} plays the", "P1303", "piano", "guitar"),
    ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([r.to_dict() for r in recs]), encoding="utf-8")
    return path


def _args(records, out, **kw):
    base = dict(model="tiny-llama", editor="rome", hparams="smollm2-135m", data=str(records), n=2,
                select_known="none", out=str(out),
                set={"layer": 0, "v_steps": 2, "mom2_adjustment": False, "context_templates": [[3, 1]]})
    return EditArgs(**{**base, **kw})


def test_edit_command_sequential_writes_scores_result_and_model(records, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run(_args(records, out))
    printed = capsys.readouterr().out
    assert "edited (E)" in printed and "E neighbourhood" in printed and "prob edited" in printed
    saved = json.loads((out / "scores.json").read_text())
    assert saved["n_edits"] == 2 and saved["hparams"]["layer"] == 0 and saved["hparams"]["v_steps"] == 2
    assert saved["edited"]["edit"]["top1"]["denominator"] == 2
    assert saved["edited"]["edit_neighborhood"]["prob"]["denominator"] == 1
    assert len(saved["probes"]) == summary["edited"]["edit"]["prob"]["denominator"] + 2  # + paraphrase, neighbour
    calls = saved["efficacy_by_call"]  # sequential, one request per call: each call's fact scored at the end
    assert [(c["call"], c["facts"]) for c in calls] == [(1, 1), (2, 1)]
    rewrite = {p["edited"]["case_id"]: p["edited"]["passed"]["prob"] for p in saved["probes"]
               if p["edited"]["kind"] == "rewrite"}
    assert [c["prob"]["count"] for c in calls] == [int(rewrite["7"]), int(rewrite["8"])]
    assert "efficacy of each call's facts" not in printed  # printed only for calls of several facts
    from retention.diskcache import file_digest as file_sha256

    provenance = saved["provenance"]
    assert provenance["corpora"] == {"knowledge": {"spec": str(records), "sha256": file_sha256(records)}}
    assert provenance["model"] == {"name": "tiny-llama", "fingerprint": saved["base_fingerprint"]}
    assert provenance["code"]["retention"] and provenance["python"]
    result = EditResult.load(out / "edit")
    assert result.case_ids == ["7", "8"] and result.layers == [0]
    (name, delta), = result.deltas.items()
    weights = load_file(str(out / "model" / "model.safetensors"))
    from retention.models import load_model

    base, _ = load_model("tiny-llama")
    assert torch.allclose(weights[name], base.get_parameter(name) + delta, atol=1e-6)
    assert (out / "model" / "tokenizer.json").exists()


def test_edit_command_single_mode_saves_one_result_per_edit(records, tmp_path):
    out = tmp_path / "single"
    assert main(["--model", "tiny-llama", "--editor", "ft-m", "--data", str(records), "--n", "2",
                 "--select_known", "none", "--mode", "single", "--out", str(out), "--hparams", "smollm2-135m",
                 "--set", "{layers: [1], steps: 2}"]) == 0
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["7", "8"]
    assert not (out / "model").exists() and not (out / "edit").exists()
    assert EditResult.load(out / "edits" / "8").editor == "ft-m"


def test_edit_command_errors(records, tmp_path):
    with pytest.raises(UsageError, match="--editor: unknown editor"):
        run(_args(records, tmp_path, editor="nope"))
    with pytest.raises(UsageError, match="--hparams/--set: .*unknown RomeHParams field.*lyer"):
        run(_args(records, tmp_path, set={"lyer": 1}))
    with pytest.raises(UsageError, match="--model: model '.*nowhere' not found"):
        run(_args(records, tmp_path, hparams=None, model=str(tmp_path / "nowhere")))
    (tmp_path / "nowhere").mkdir()  # a local model folder with no preset of its name
    with pytest.raises(UsageError, match="--hparams/--set: .*no preset 'nowhere'"):
        run(_args(records, tmp_path, hparams=None, model=str(tmp_path / "nowhere")))
    with pytest.raises(UsageError, match="--n 0 must be at least 1"):
        run(_args(records, tmp_path, n=0))
    assert not (tmp_path / "scores.json").exists()


def test_edit_command_malformed_record_raises_or_is_skipped(records, tmp_path):
    rows = json.loads(records.read_text())
    rows.insert(1, {**rows[0], "case_id": "9", "target_new": rows[0]["target_true"]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.json: record 1 \(case_id \"9\"\): field 'target_new'") as err:
        run(_args(bad, tmp_path / "a"))
    assert "on_error='skip'" in "".join(getattr(err.value, "__notes__", []))
    summary = run(_args(bad, tmp_path / "b", on_error="skip", set={**_args(bad, tmp_path).set, "v_steps": 2}))
    assert summary["n_edits"] == 2


def test_edit_command_prints_efficacy_per_call_of_several_facts(records, tmp_path, capsys):
    summary = run(_args(records, tmp_path / "calls", batch_size=2))
    assert [(c["call"], c["facts"]) for c in summary["efficacy_by_call"]] == [(1, 2)]
    assert "call   1 (2 facts)" in capsys.readouterr().out


def test_edit_command_refuses_a_non_positive_n_when_parsing(records, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny-llama", "--data", str(records), "--n", "-1", "--out", str(out)])
    assert exit_.value.code == 2
    assert 'key "n"' in capsys.readouterr().err
    assert not out.exists()


def test_edit_command_from_a_config_file(records, tmp_path, capsys):
    """``retention edit -c edit.yaml`` (as ``--print_config`` writes it), a later flag overriding the file."""
    out = tmp_path / "from_config"
    config = tmp_path / "edit.yaml"
    config.write_text(f"model: tiny-llama\neditor: ft-m\ndata: {records}\nn: 2\nselect_known: none\n"
                      f"mode: batch\nhparams: smollm2-135m\nset: {{layers: [1], steps: 2}}\nout: {tmp_path / 'x'}\n"
                      "device: cpu\n")
    assert main(["-c", str(config), "--out", str(out), "--save_model", "false"]) == 0
    saved = json.loads((out / "scores.json").read_text())
    assert (saved["editor"], saved["mode"], saved["n_edits"], saved["dtype"]) == ("ft-m", "batch", 2, "float32")
    assert saved["hparams"]["steps"] == 2 and saved["device"] == "cpu"
    assert read_edit_folder(out)["editor"] == "ft-m"  # a float32 edit is what fit's edits.precomputed takes
    assert not (out / "model").exists() and not (tmp_path / "x").exists()


def test_edit_command_in_bfloat16_edits_but_is_no_precomputed_edit_for_fit(records, tmp_path, capsys):
    out = tmp_path / "bf16"
    summary = run(_args(records, out, mode="batch", dtype="bfloat16", save_model=False, device="cpu"))
    assert summary["dtype"] == "bfloat16" and summary["edited"]["edit"]["prob"]["denominator"] == 2
    assert (out / "edit" / "edit.json").exists()
    assert not (out / "edited_weights.safetensors").exists() and not (out / "facts.jsonl").exists()
    assert "cannot be `retention fit`'s edits.precomputed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="edited in bfloat16.*--dtype float32"):
        read_edit_folder(out)


def test_case_ids_from_data_never_leave_the_output_folder(records, tmp_path):
    rows = json.loads(records.read_text())
    rows[0]["case_id"], rows[1]["case_id"] = "../../escaped", str(tmp_path / "absolute")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert main(["--model", "tiny-llama", "--editor", "ft-m", "--data", str(bad), "--n", "2", "--select_known",
                 "none", "--mode", "single", "--out", str(out), "--hparams", "smollm2-135m",
                 "--set", "{layers: [1], steps: 1}"]) == 0
    saved = sorted(p.name for p in (out / "edits").iterdir())
    assert len(saved) == 2 and all("/" not in n and n not in (".", "..") for n in saved)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()


def test_single_mode_refuses_case_ids_that_share_an_edit_folder(records, tmp_path):
    rows = json.loads(records.read_text())
    rows[0]["case_id"], rows[1]["case_id"] = "a/b", "a_b"
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps(rows))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"case ids 'a/b' and 'a_b' both name the edit folder edits/a_b"):
        main(["--model", "tiny-llama", "--editor", "ft-m", "--data", str(clash), "--n", "2", "--select_known",
              "none", "--mode", "single", "--out", str(out), "--hparams", "smollm2-135m",
              "--set", "{layers: [1], steps: 1}"])
    assert not out.exists()


def test_edit_command_shows_a_progress_bar_with_eta_while_scoring(records, tmp_path, capsys):
    run(_args(records, tmp_path / "run", n=1))
    err = capsys.readouterr().err
    assert err.count("scoring:   0%") == 2 and "scoring: 100%" in err  # the unedited and the edited model
    assert "[00:00<00:00" in err  # tqdm's elapsed<remaining


def test_single_mode_shows_one_bar_over_the_edits(records, tmp_path, capsys):
    run(_args(records, tmp_path / "run", mode="single"))
    err = capsys.readouterr().err
    assert "scoring each edit: 100%" in err and "2/2" in err


def test_an_easyedit_file_given_without_its_prefix_gets_the_hint(records, tmp_path):
    hparams = tmp_path / "ROME-tiny.yaml"
    hparams.write_text("alg_name: ROME\nlayers: [0]\nv_num_grad_steps: 2\nmodel_name: tiny\nv_lr: 0.5\n")
    with pytest.raises(UsageError, match=r"unknown RomeHParams field\(s\) alg_name, layers, model_name, "
                                         r"v_num_grad_steps.*; .*ROME-tiny\.yaml holds EasyEdit fields \(alg_name, "
                                         r"layers, model_name, v_num_grad_steps\): give it as easyedit:.*ROME-tiny"):
        run(_args(records, tmp_path / "run", hparams=str(hparams), set=None))
    own = tmp_path / "rome.yaml"  # a file of our own fields with a typo gets no EasyEdit hint
    own.write_text("layer: 0\nv_stepz: 2\n")
    with pytest.raises(UsageError) as err:
        run(_args(records, tmp_path / "run", hparams=str(own), set=None))
    assert "v_stepz" in str(err.value) and "EasyEdit" not in str(err.value)
