"""The package map (docs/architecture.md) holds: no import cycle, no upward import, no stage importing
another stage, small modules and functions. Built from the source with `ast`, not by importing it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "longrope2"
DOCS = Path(__file__).resolve().parents[1] / "docs"

# What each subpackage may import besides itself (docs/architecture.md); stages (top-level modules) may
# import every subpackage, never another stage.
ALLOWED = {
    "rope": set(),
    "core": {"rope"},
    "data": {"core", "rope"},
    "lm": {"core", "rope", "data"},
    "reporting": {"core", "rope"},
    "toy": {"core", "rope", "data", "lm"},
    "evolution": {"core", "rope", "data", "lm"},
    "training": {"core", "rope", "data", "lm"},
    "evaluation": {"core", "rope", "data", "lm", "reporting"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The longrope2 modules a module imports (a `from pkg import mod` names the module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("longrope2")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("longrope2"):
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return out - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def room(name: str) -> str | None:
    """The subpackage a module lives in; None for a stage (a top-level module) or the package itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (SRC / parts[1]).is_dir()) else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert room("longrope2.rope.factors") == "rope" and room("longrope2.train") is None


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_every_subpackage_imports_only_what_the_map_allows():
    assert set(ALLOWED) == {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    upward = [f"{name} imports {dep}" for name, deps in GRAPH.items() if room(name)
              for dep in deps if room(dep) not in ALLOWED[room(name)] | {room(name)}]
    assert upward == []


def test_no_stage_imports_another_stage():
    stages = {name for name in MODULES if name.count(".") == 1 and room(name) is None}
    assert {"longrope2.search", "longrope2.train", "longrope2.evaluate", "longrope2.report"} <= stages
    crossing = [f"{name} imports {dep}" for name in stages for dep in GRAPH[name] if dep in stages]
    assert crossing == []


def test_modules_and_functions_are_small():
    big = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name, p in MODULES.items()
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert big == {} and long == []


def test_figures_have_one_home():
    users = [name for name, p in MODULES.items() if re.search(r"^\s*import matplotlib", p.read_text(), re.M)]
    assert users == ["longrope2.reporting.figures"]


@pytest.mark.parametrize("room_name", sorted(ALLOWED))
def test_the_architecture_doc_states_each_rooms_imports(room_name):
    doc = (DOCS / "architecture.md").read_text()
    line = next((row for row in doc.splitlines() if row.startswith(f"| `{room_name}/`")), None)
    assert line is not None, f"docs/architecture.md has no row for {room_name}/"
    stated = set(re.findall(r"`(\w+)`", line.split("|")[3]))
    assert stated == ALLOWED[room_name], line
