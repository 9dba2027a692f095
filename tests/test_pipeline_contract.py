"""The pipeline's contract: hooks dispatched by type, the callbacks' order checked, and no callback reaching
another one except through the PipelineState."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from retention.pipeline_contract import PipelineCallback, check_order, pipeline_callbacks


class Edits(PipelineCallback):
    pass


class Freeze(PipelineCallback):
    runs_after = ("Edits",)


def test_check_order_keeps_pipeline_callbacks_in_order_and_ignores_others():
    edits, freeze, other = Edits(), Freeze(), LearningRateMonitor()
    assert check_order([other, edits, freeze]) == [edits, freeze]
    assert check_order([freeze]) == [freeze]  # what it follows is absent: nothing to check


def test_check_order_names_the_callback_that_must_come_first():
    with pytest.raises(ValueError, match="Edits must come before Freeze"):
        check_order([Freeze(), Edits()])


def test_default_hooks_are_no_ops():
    cb = PipelineCallback()
    assert cb.on_before_edits(None, None, []) is None
    assert cb.on_base_model_ready(None, None) is None
    assert cb.on_edits_applied(None, None, None) is None


def test_pipeline_callbacks_keeps_their_order_without_checking_it():
    edits, freeze, other = Edits(), Freeze(), LearningRateMonitor()
    assert pipeline_callbacks([freeze, other, edits]) == [freeze, edits]


def test_the_module_and_the_callbacks_import_the_contract_from_below_both():
    """The contract imports nothing of the package; modules.finetune reads it without importing retention.callbacks
    (a floor it is not below)."""
    code = ("import sys, retention.pipeline_contract; "
            "print(sorted(m for m in sys.modules if m.startswith('retention.'))); "
            "import retention.modules.finetune as f, retention.pipeline_contract as c; "
            "assert f.PipelineState is c.PipelineState; "
            "print(sorted(m for m in sys.modules if m.startswith('retention.callbacks')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["['retention.pipeline_contract']", "[]"]
    from retention.callbacks import PipelineCallback as exported

    assert exported is PipelineCallback


CALLBACKS = Path(__file__).resolve().parents[1] / "retention" / "callbacks"
DISPATCH = {"pipeline_callbacks", "check_order"}
"""The contract's functions that may be handed ``trainer.callbacks`` (to call the pipeline hooks in order)."""


def sibling_reaches(folder: Path) -> list[str]:
    """Where a module in ``folder`` reaches a callback of another module: names one of its classes (import,
    isinstance, attribute) or reads ``trainer.callbacks`` other than through :data:`DISPATCH`."""
    trees = {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.py"))
             if p.name != "__init__.py"}
    classes = [(stem, node) for stem, tree in trees.items() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    owner: dict[str, str] = {}
    while True:  # callback classes: bases named *Callback, or another callback class
        found = {node.name: stem for stem, node in classes
                 if any(ast.unparse(b).endswith("Callback") or ast.unparse(b) in owner for b in node.bases)}
        if found == owner:
            break
        owner = found
    out = []
    for stem, tree in trees.items():
        handed = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and ast.unparse(node.func).rpartition(".")[2] in DISPATCH for arg in node.args}
        for node in ast.walk(tree):
            name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.name if isinstance(node, ast.alias) else None)
            if name in owner and owner[name] != stem:
                out.append(f"{stem}.py:{getattr(node, 'lineno', '?')} names {owner[name]}.{name}")
            if (isinstance(node, ast.Attribute) and ast.unparse(node) == "trainer.callbacks"
                    and id(node) not in handed):
                out.append(f"{stem}.py:{node.lineno} reads trainer.callbacks")
    return out


def test_callbacks_reach_each_other_only_through_the_pipeline_state():
    """docs/design.md: the callbacks pass data to one another only through the module's PipelineState."""
    assert sibling_reaches(CALLBACKS) == []


def test_the_check_sees_a_callback_reading_another(tmp_path):
    (tmp_path / "monitor.py").write_text("class Monitor(PipelineCallback):\n    probes = []\n")
    (tmp_path / "late.py").write_text(
        "from monitor import Monitor\n"
        "class Late(PipelineCallback):\n"
        "    def setup(self, trainer, pl_module, stage):\n"
        "        for cb in pipeline_callbacks(trainer.callbacks):\n"
        "            pass\n"
        "        self.m = next(cb for cb in trainer.callbacks if isinstance(cb, Monitor)).probes\n")
    assert sorted(sibling_reaches(tmp_path)) == ["late.py:1 names monitor.Monitor", "late.py:6 names monitor.Monitor",
                                                 "late.py:6 reads trainer.callbacks"]
