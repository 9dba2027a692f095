"""The package's floors (docs/design.md, "Import layering"): every import, inside functions too, points down or
stays on its floor."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retention"

FLOORS = [
    # 1. ground
    {"retention.io", "retention.records", "retention.tokens", "retention.arch", "retention.distributed",
     "retention.paths", "retention.config", "retention.diskcache", "retention.models", "retention.prose",
     "retention.corpus", "retention.provenance"},
    # 2. scoring, metrics, run summaries
    {"retention.scoring", "retention.metrics", "retention.summary"},
    # 3. editing
    {"retention.editing"},
    # 4. data
    {"retention.data"},
    # 5. the pipeline contract
    {"retention.pipeline_contract"},
    # 6. callbacks and modules
    {"retention.callbacks", "retention.modules"},
    # 7. runs
    {"retention.runfolder", "retention.runlog", "retention.fitting"},
    # 8. studies
    {"retention.study"},
    # 9. commands and entry points
    {"retention.commands", "retention.cli", "retention.api", "retention", "retention.__main__"},
]


def floor(module: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{module}: on no floor of docs/design.md; add it to FLOORS and to the docs"
    return best[0] + 1


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported retention module, whether the import sits inside a function) for every import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base]
        else:
            continue
        out += [(t, id(node) in inside) for t in targets if t == "retention" or t.startswith("retention.")]
    return out


def test_every_import_points_down_or_stays_on_its_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target, in_function in imports(path):
            if target == "retention" and in_function:
                continue  # the version string and the lazy API: the package's __init__ imports nothing heavy
            if floor(target) > floor(source):
                upward.append(f"{source} (floor {floor(source)}) -> {target} (floor {floor(target)})"
                              + (" inside a function" if in_function else ""))
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "retention" / "io.py"
    bad.parent.mkdir()
    bad.write_text("from retention.study.report import write_report\n")
    assert [(t, inside) for t, inside in imports_of(bad, tmp_path)] == [("retention.study.report", False)]
    assert floor("retention.study.report") > floor("retention.io")


def imports_of(path: Path, root: Path) -> list[tuple[str, bool]]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, root / "retention"
    try:
        return imports(path)
    finally:
        PACKAGE = saved
