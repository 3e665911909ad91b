"""The layout holds: dependencies point one way with no import cycles, only launch/ knows Slurm, and only
pipeline/rundir.py spells the run folder's layout (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("pipeline", "launch", "benchmarks")

# Lower layers never import higher ones (same-rank imports are allowed; cycles are checked separately).
LAYERS = [
    ("pipeline.files",),
    ("pipeline.config",),
    ("pipeline.rundir",),
    ("pipeline.data", "pipeline.model"),
    ("pipeline.tracking",),
    ("pipeline.train",),
    ("pipeline.finetune",),
    ("pipeline.worker",),
    ("launch",),
    ("pipeline.cli", "pipeline.__main__"),
    ("benchmarks",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules this module imports, anywhere in it (deferred imports inside functions count)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _rank(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of test_layout.LAYERS: add it")


def test_the_graph_is_real():
    graph = _graph()
    assert "pipeline.train.trainer" in graph["pipeline.worker"]  # a deferred import is seen
    assert "pipeline.config.schema" in graph["pipeline.config.load"]


def test_there_are_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_dependencies_point_one_way():
    wrong = [
        f"{a} imports {b}"
        for a, deps in _graph().items()
        for b in sorted(deps)
        if _rank(b) > _rank(a) and not a.startswith("pipeline.config") and a != b
    ]
    assert not wrong, "\n".join(wrong)


def test_only_launch_knows_slurm():
    for name, path in _modules().items():
        if name.startswith("launch"):
            continue
        text = path.read_text()
        assert not re.search(r"SLURM[A-Z_]*|^\s*(import|from) submitit", text, flags=re.M), (
            f"{path.relative_to(ROOT)} reads Slurm's environment or uses submitit; only launch/ may"
        )
    pipeline_imports = {b for a, deps in _graph().items() if a.startswith("pipeline") for b in deps}
    importers = {
        a for a, deps in _graph().items() if a.startswith("pipeline") and any(d.startswith("launch") for d in deps)
    }
    assert importers <= {"pipeline.cli"}, f"only the CLI may call into launch/: {sorted(importers)}"
    assert any(m.startswith("launch") for m in pipeline_imports)


RUN_FOLDER_NAMES = (
    "summary.json",
    "config.yaml",
    "checkpoints",
    "train_log.jsonl",
    "tracking_spool.jsonl",
    "status.json",
)


def test_only_rundir_spells_the_run_folder():
    for name, path in _modules().items():
        if name in ("pipeline.rundir", "launch.slurm.status"):  # status.json is the Slurm folder's own file
            continue
        for literal in re.findall(r"""["']([^"'\n]+)["']""", path.read_text()):
            assert literal not in RUN_FOLDER_NAMES, f"{path.relative_to(ROOT)} spells '{literal}': ask RunDir"


def test_functions_fit_in_a_head():
    """Functions a reader can hold in their head (well under 60 lines), the Trainer's methods included."""
    long = []
    for _name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # the docstring does not count: it is for the reader
                doc = (
                    node.body[0]
                    if node.body
                    and isinstance(node.body[0], ast.Expr)
                    and isinstance(node.body[0].value, ast.Constant)
                    and isinstance(node.body[0].value.value, str)
                    else None
                )
                if doc is not None:
                    length -= doc.end_lineno - doc.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)
