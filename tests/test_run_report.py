"""RunReport's pieces: the collapse check it shares with `retention fit`'s report, and the curve figure, which
draws no empty panel when nothing passed at t=0 under a protocol."""

from __future__ import annotations

import math
from types import SimpleNamespace

from matplotlib.image import imread

from retention.callbacks.report import collapse_reason, drawable_curves, plot_run_curves

NAN = math.nan
CURVES = {
    "edit": {"top1": [[0, NAN], [3, NAN]], "prob": [[0, 1.0], [3, 0.5]], "gen": [[0, NAN], [3, NAN]]},
    "control": {"top1": [[0, NAN], [3, NAN]], "prob": [[0, 1.0], [3, 0.8]], "gen": [[0, None], [3, None]]},
}


def test_collapse_reason_reads_the_validations_against_the_vocabulary(tiny_llama):
    model = tiny_llama[0]
    vocab = model.get_output_embeddings().weight.shape[0]
    healthy = SimpleNamespace(model=model, validations=[{"step": 0, "val/loss": 2.0}, {"step": 5, "val/loss": 2.1}])
    collapsed = SimpleNamespace(model=model, validations=[{"step": 0, "val/loss": 2.0},
                                                          {"step": 5, "val/loss": math.log(vocab)}])
    assert collapse_reason(healthy) is None
    assert f"ln({vocab})" in collapse_reason(collapsed)
    assert collapse_reason(SimpleNamespace(model=model, validations=[])) is None


def test_only_protocols_with_a_probe_passing_at_t0_get_a_panel(tmp_path):
    kept, empty = drawable_curves(CURVES)
    assert kept == {"edit": {"prob": CURVES["edit"]["prob"]}, "control": {"prob": CURVES["control"]["prob"]}}
    assert empty == ["top1", "gen"]
    control_top1 = {**CURVES, "control": {**CURVES["control"], "top1": [[0, 1.0], [3, 0.7]]}}
    kept, empty = drawable_curves(control_top1)
    assert list(kept["edit"]) == list(kept["control"]) == ["top1", "prob"] and empty == ["gen"]
    one = plot_run_curves(CURVES, tmp_path / "one.png", "run")
    both = {g: {p: c for p, c in by.items() if p != "gen"} for g, by in CURVES.items()}
    both["edit"]["top1"] = [[0, 1.0], [3, 1.0]]
    two = plot_run_curves(both, tmp_path / "two.png", "run")
    # One panel is 4.2 inches wide at 110 dpi: the figure of one drawable protocol is half as wide as that of two.
    assert imread(one).shape[1] == round(4.2 * 110) and imread(two).shape[1] == round(2 * 4.2 * 110)


def test_no_figure_when_no_probe_passed_at_t0_under_any_protocol(tmp_path):
    nothing = {"edit": {"top1": [[0, NAN], [3, NAN]]}}
    assert plot_run_curves(nothing, tmp_path / "c.png", "run") is None
    assert not (tmp_path / "c.png").exists()
