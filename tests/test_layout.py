"""The package's shape is part of how it is maintained: stages in their own sub-packages, tools apart from
them, and no class or function too long to hold in one's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
STAGES = ("sources", "batching", "inference", "analytics", "publishing", "ops", "tools")
MAX_FLAT_MODULES = 12
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _spans(kind: type[ast.AST]) -> list[tuple[str, int]]:
    spans = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, kind):
                assert isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                end = node.end_lineno or node.lineno
                spans.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", end - node.lineno + 1))
    return spans


def test_each_stage_is_a_sub_package() -> None:
    missing = [stage for stage in STAGES if not (PACKAGE / stage / "__init__.py").is_file()]
    assert not missing


def test_the_top_level_stays_small() -> None:
    flat = [path.name for path in PACKAGE.glob("*.py")]
    assert len(flat) <= MAX_FLAT_MODULES, sorted(flat)


@pytest.mark.parametrize(("kind", "limit"), [(ast.ClassDef, MAX_CLASS_LINES), (ast.FunctionDef, MAX_FUNCTION_LINES)],
                         ids=["classes", "functions"])
def test_no_class_or_function_is_too_long(kind: type[ast.AST], limit: int) -> None:
    too_long = [f"{where} ({lines} lines)" for where, lines in _spans(kind) if lines > limit]
    assert not too_long


def test_runtime_stages_never_import_the_tools() -> None:
    """The tools build on the pipeline, never the other way round: a camera site's process must not load the
    benchmark or the synthetic world."""
    offenders = []
    for path in _modules():
        if "tools" in path.relative_to(PACKAGE).parts or path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.tools"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {node.module}")
    assert not offenders


def test_no_stage_imports_the_http_layer() -> None:
    offenders = []
    for path in _modules():
        parts = path.relative_to(PACKAGE).parts
        # The dashboard is a web app of its own (it serves pages, it is no stage of the pipeline).
        if parts[0] in ("ops", "tools", "dashboard") or path.name in ("app.py", "cli.py"):
            continue
        if "pipeline.ops.http" in path.read_text(encoding="utf-8"):
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert not offenders
