"""EditAfterFineTune (``after.mode``): the run's edit made again on the fine-tuned weights (``reedit``) or only
there (``only_after``), what ApplyEdits does for it, the combinations it refuses, and a ``retention fit`` run that
writes ``after_finetune``."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from editing_models import edit_model
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from memit_cases import write_corpus
from tiny_runs import ROME, fit_config, prepare

from retention.arch import unwrap_model
from retention.callbacks import PIPELINE
from retention.callbacks.after_finetune import EditAfterFineTune
from retention.callbacks.apply_edits import ApplyEdits
from retention.callbacks.freeze import FreezeLayers
from retention.callbacks.monitor import RetentionMonitor
from retention.callbacks.probing import ScoreSettings, measure
from retention.models import model_fingerprint
from retention.pipeline_contract import PipelineCallback, PipelineState
from retention.records import Probe
from retention.scoring import score_probes

EDITED = "model.layers.0.mlp.down_proj.weight"


class Recorder(PipelineCallback):
    """Records the model's fingerprint where the monitor measures t=0 (ApplyEdits' hand-over)."""

    def on_edits_applied(self, trainer, pl_module, sets) -> None:
        self.fingerprint = model_fingerprint(pl_module.model)


class StartFingerprint(Callback):
    """Writes the fingerprint of the weights fine-tuning starts from to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            f.write(model_fingerprint(unwrap_model(pl_module.model)))


def rewrites_passing(model, tokenizer, sets) -> int:
    probes = [p for p in sets.probes() if p.kind == "rewrite"]
    return sum(r.passed["prob"] for r in score_probes(model, tokenizer, probes, ("prob",)))


def test_reedit_lands_the_edit_on_fine_tuned_weights_with_the_base_set_up(tiny_llama, tmp_path, monkeypatch):
    """ApplyEdits under ``edit_later`` (ROME with key statistics, 2 edits) edits as usual and hands over the edit
    to make again; made in "fine-tuned" weights, it changes the edited weight and the rewrites pass there, with
    the key statistics of the base model."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    hparams = {**ROME, "mom2_adjustment": True, "mom2_corpus": str(write_corpus(tmp_path)), "mom2_samples": 64,
               "mom2_max_length": 32}
    edits = ApplyEdits(n_edit=2, known_protocol="none", max_candidates=20, hparams=hparams, cache=False)
    recorder, tokenizer = Recorder(), tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    state = PipelineState(edit_later=True)
    base = model_fingerprint(model)
    edits.on_base_model_ready(SimpleNamespace(callbacks=[edits, recorder], datamodule=None),
                              SimpleNamespace(model=model, tokenizer=tokenizer, model_name=None, pipeline=state))
    assert state.edited_layers == [0] and recorder.fingerprint == model_fingerprint(model) != base
    covariances = sorted((tmp_path / "cache" / "covariance").rglob("*"))
    assert covariances  # set up on the base model
    # "Fine-tuning" that moves every weight, the edited one back to near its unedited value.
    tuned = edit_model("llama", len(tokenizer))
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = tuned.get_parameter(EDITED).detach().clone()
    kept = copy.deepcopy(tuned)
    applied = state.edit_again(tuned)
    assert applied.layers == [0] and EDITED in applied.parameters
    assert not torch.equal(tuned.get_parameter(EDITED), before)
    assert rewrites_passing(tuned, tokenizer, state.sets) == 2 >= rewrites_passing(kept, tokenizer, state.sets)
    # The key statistics came from the base model's cache entries: none computed from the tuned weights.
    assert sorted((tmp_path / "cache" / "covariance").rglob("*")) == covariances


def _setup(mode: str, *callbacks, strategy=None) -> PipelineState:
    """The state after the ``setup`` of ``callbacks`` and then of EditAfterFineTune(mode), as Lightning calls them."""
    state = PipelineState()
    trainer = SimpleNamespace(strategy=strategy or SingleDeviceStrategy("cpu"),
                              callbacks=[*callbacks, EditAfterFineTune(mode)])
    for callback in trainer.callbacks:
        callback.setup(trainer, SimpleNamespace(pipeline=state), "fit")
    return state


def test_modes_set_the_pipeline_state_and_none_changes_nothing():
    assert _setup("none", RetentionMonitor()) == PipelineState(score_settings=RetentionMonitor().settings)
    assert (lambda s: (s.edit_later, s.defer_edits))(_setup("reedit", RetentionMonitor())) == (True, False)
    assert (lambda s: (s.edit_later, s.defer_edits))(_setup("only_after", RetentionMonitor())) == (True, True)
    names = list(PIPELINE)
    assert names.index("after") == names.index("monitor") + 1 and names[-1] == "report"


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused(strategy):
    with pytest.raises(ValueError, match="after.mode reedit: the fine-tuned weights are sharded"):
        _setup("reedit", RetentionMonitor(), strategy=strategy())


def test_refused_combinations_name_the_flags(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="after.mode='later': unknown"):
        EditAfterFineTune("later")
    with pytest.raises(ValueError, match="after.mode only_after .* freeze.policy window"):
        _setup("only_after", RetentionMonitor(), FreezeLayers("window"))
    _setup("only_after", RetentionMonitor(), FreezeLayers("list", layers=[1]))  # freezes without edited layers
    with pytest.raises(ValueError, match="add the monitor"):
        _setup("reedit")
    state = PipelineState(edit_later=True)
    with pytest.raises(ValueError, match="after.mode .* edits.n_edit is 0"):
        ApplyEdits(n_control=2).on_base_model_ready(None, SimpleNamespace(pipeline=state))
    edit_model("llama", len(tiny_llama[1])).save_pretrained(tmp_path / "edited")
    with pytest.raises(ValueError, match="after.mode: edits.edited_model gives an edit made elsewhere"):
        ApplyEdits(edited_model=str(tmp_path / "edited")).on_base_model_ready(None, SimpleNamespace(pipeline=state))


def test_edit_after_fine_tune_reads_only_the_pipeline_state(tiny_llama):
    """With no monitor or freeze callback anywhere (the trainer has no callbacks), EditAfterFineTune edits the
    merged model and measures it against t=0 from what the state holds: probes, score settings, baseline."""
    tokenizer = tiny_llama[1]
    model = edit_model("llama", len(tokenizer))
    probes = [Probe(" The capital of France is", "Paris", "Rome"),
              Probe(" The capital of Italy is", "Rome", "Paris", kind="neighborhood"),
              Probe(" Water is", "wet", "dry", kind="control")]
    settings = ScoreSettings(("top1", "prob"), batch_size=2)
    _, baseline = measure(model, tokenizer, probes, settings, 0)

    def edit_again(target):
        with torch.no_grad():
            target.get_parameter(EDITED).add_(0.5 * torch.randn_like(target.get_parameter(EDITED)))
        return SimpleNamespace(layers=[0], hparams={"lr": 1}, diagnostics=[{"case": 1}])

    state = PipelineState(score_settings=settings, probes=probes, baseline=baseline, edit_again=edit_again)
    tuned = copy.deepcopy(model)
    pl_module = SimpleNamespace(pipeline=state, tokenizer=tokenizer, merged_model=lambda: tuned)
    torch.manual_seed(0)
    EditAfterFineTune("only_after").on_train_end(SimpleNamespace(global_step=3), pl_module)
    torch.manual_seed(0)
    edit_again(model)  # the same edit, made here
    expected, _ = measure(model, tokenizer, probes, settings, 3, baseline)
    after = state.after
    assert after.mode == "only_after" and after.measurement.step == 3 and after.edit_seconds > 0
    assert after.measurement.rates == expected.rates
    assert [r.probe for r in after.measurement.results] == probes
    assert state.edit == {"hparams": {"lr": 1}, "edited_layers": [0], "edit_diagnostics": [{"case": 1}]}


def test_fit_only_after_writes_after_finetune(tmp_path, tiny_llama, monkeypatch):
    """``retention fit`` with after.mode only_after: fine-tuning starts from the unedited base model, and
    summary.json and the probe files hold the edit made on the fine-tuned weights."""
    from retention.commands.fit import main

    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    prepare(tmp_path, tiny_llama[1])
    config = fit_config(tmp_path, "after", protocols=["prob", "top1"], max_steps=2)
    config["edits"].update(n_edit=2, n_control=2, cache=False, hparams=dict(ROME))
    config["monitor"]["every_n_steps"] = 0
    config["run"]["validate_first"] = False
    config["after"] = {"mode": "only_after"}
    start = tmp_path / "start.txt"
    config["trainer"]["callbacks"] = [{"class_path": "test_after_finetune.StartFingerprint",
                                       "init_args": {"path": str(start)}}]
    (tmp_path / "after.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["--config", str(tmp_path / "after.yaml")]) == 0
    folder = tmp_path / "runs" / "after"
    summary = json.loads((folder / "summary.json").read_text())
    assert start.read_text() == summary["run"]["base_fingerprint"]  # no edit before fine-tuning, nor at t=0
    after = summary["after_finetune"]
    assert list(after) == ["mode", "step", "edit_seconds", "measure_seconds", "accuracy", "retention"]
    assert after["mode"] == "only_after" and after["step"] == summary["final_step"] == 2
    assert after["edit_seconds"] > 0 and after["measure_seconds"] > 0
    assert summary["run"]["edited_layers"] == [0] and len(summary["run"]["edit_diagnostics"]) == 2
    assert after["accuracy"]["edit"]["prob"] == {"value": 1.0, "count": 2, "denominator": 2}
    assert {g: list(p) for g, p in after["accuracy"].items()} == \
           {g: list(p) for g, p in summary["final_accuracy"].items()}
    rows = lambda name: [json.loads(line) for line in (folder / "probes" / name).read_text().splitlines()]  # noqa: E731
    t0, end = rows("step_000000.jsonl"), rows("after_finetune.jsonl")
    assert [r["prompt"] for r in end] == [r["prompt"] for r in t0]
    assert {r["after_finetune"] for r in end} == {"only_after"} and {r["step"] for r in end} == {2}
    for group, by_protocol in after["retention"].items():
        for protocol, rate in by_protocol.items():
            pairs = [(a["passed"][protocol], b["passed"][protocol]) for a, b in zip(t0, end) if a["group"] == group]
            assert (rate["count"], rate["denominator"]) == (sum(a and b for a, b in pairs), sum(a for a, _ in pairs))
