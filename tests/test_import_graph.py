"""The package's modules import each other without a circle, function-level imports
included (a circle hidden inside a function still ties the modules together)."""
from __future__ import annotations

import ast
from pathlib import Path

import nbretr

PKG = Path(nbretr.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every ``nbretr`` module that ``path`` imports anywhere in its body."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module that the name starts with
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]], ignore: set[str]) -> list[str] | None:
    """One cycle among the modules not in ``ignore`` (packages' ``__init__`` re-exports are
    ignored: importing ``nbretr.x`` always runs ``nbretr/__init__`` first)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n in ignore:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and m not in ignore:
            found = visit(m)
            if found:
                return found
    return None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "nbretr.builders" in graph["nbretr.eval"]
    assert "nbretr.eval" in graph["nbretr.train"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, set()) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, set()) is None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    packages = {m for m in graph if (PKG.parent / m.replace(".", "/") / "__init__.py").is_file()}
    assert find_cycle(graph, packages) is None
