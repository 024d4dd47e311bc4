"""The house's plan, checked: no import cycle anywhere in src/hire, and the lower floors never
reach up (STYLE.md: commands -> serve/engine/calibrate/eval -> patch/layers -> proxies/native -> topk).

The graph is read from the source by AST, so an import hidden inside a function counts as much as
one at the top of a module (it runs as soon as the function does). Importing ``hire.a.b`` also
runs ``hire/a/__init__.py`` unless the importer is inside ``hire.a`` already, so that is an edge too.
Imports under ``if TYPE_CHECKING:`` never run and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# the bottom floor: imported by every room, importing only each other
BOTTOM = {"hire.paths", "hire.errors", "hire.files", "hire.arch", "hire.topk"}
# room -> rooms it must never import (a prefix covers the package and its modules)
NEVER = {
    "hire.proxies": ("hire.layers", "hire.patch", "hire.engine", "hire.models"),
    "hire.layers": ("hire.patch", "hire.engine", "hire.models", "hire.cli", "hire.commands"),
}
# the command line sits on top: only it (and ``python -m hire``) imports it
TOP = ("hire.cli", "hire.commands", "hire.__main__")


def module_names(src: Path) -> dict[str, Path]:
    """Dotted name -> file for every module under ``src`` (a package is its __init__.py)."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in ``tree``, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(src: Path, root: str = "hire") -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, for modules of ``root`` only."""
    modules = module_names(src)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        if not _within(name, root):
            continue
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, {})

        def add(target: str, line: int) -> None:
            while target not in modules and "." in target:  # `import hire.x.attr`: the module part
                target = target.rsplit(".", 1)[0]
            if not _within(target, root) or target not in modules:
                return
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the target and the packages its import initialises
                step = ".".join(parts[:i])
                if step != name and not _within(name, step):
                    edges.setdefault(step, line)

        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n".join(f"  {a} -> {b}  (line {graph[a][b]} of {a})" for a, b in zip(cycle, cycle[1:]))


@pytest.fixture(scope="module")
def graph():
    return import_graph(SRC)


def test_the_graph_sees_hidden_imports_and_skips_type_checking(tmp_path):
    """The checker itself: a cycle through a function-level import is found; TYPE_CHECKING is not one."""
    pkg = tmp_path / "hire"
    (pkg / "room").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hire.room.high import X\n"
    )
    (pkg / "room" / "__init__.py").write_text("from hire.room.high import X\n")
    (pkg / "room" / "high.py").write_text("from hire import low\nX = 1\n")
    g = import_graph(tmp_path)
    assert g["hire.room.high"] == {"hire.low": 1}
    assert g["hire.low"] == {}
    assert find_cycle(g) is None
    (pkg / "low.py").write_text("def f():\n    from hire.room.high import X\n    return X\n")
    g = import_graph(tmp_path)
    assert set(g["hire.low"]) == {"hire.room", "hire.room.high"}  # the package __init__ runs first
    assert find_cycle(g) is not None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, graph)


def test_the_bottom_floor_imports_only_the_bottom_floor(graph):
    bad = {m: sorted(t for t in graph[m] if t not in BOTTOM) for m in BOTTOM}
    assert not any(bad.values()), bad


def test_topk_is_pure_functions():
    """topk.py: no nn.Module and no transformers, only tensors in and out."""
    tree = ast.parse((SRC / "hire" / "topk.py").read_text())
    imported = {alias.name for node in _import_nodes(tree) for alias in node.names} | {
        node.module or "" for node in _import_nodes(tree) if isinstance(node, ast.ImportFrom)
    }
    assert not {name for name in imported if name.split(".")[0] == "transformers"}
    assert not {name for name in imported if name in ("nn", "torch.nn")}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "Module"]


@pytest.mark.parametrize("room", sorted(NEVER))
def test_rooms_never_import_rooms_above_them(graph, room):
    bad = {
        module: sorted(t for t in targets if any(_within(t, above) for above in NEVER[room]))
        for module, targets in graph.items()
        if _within(module, room)
    }
    assert not any(bad.values()), {m: t for m, t in bad.items() if t}


def test_only_the_command_line_imports_the_command_line(graph):
    bad = {
        module: sorted(t for t in targets if any(_within(t, top) for top in TOP))
        for module, targets in graph.items()
        if not any(_within(module, top) for top in TOP)
    }
    assert not any(bad.values()), {m: t for m, t in bad.items() if t}
