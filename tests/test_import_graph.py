"""The import graph of controlplane, dataplane and sdk: no cycles, and the layers hold
(the control plane and the data plane never import the SDK).

Each module is parsed with ``ast``; every import of a project module counts, at module
level or inside a function (a function-level import that closes a cycle is a cycle
all the same, only deferred). Imports under ``if TYPE_CHECKING:`` never run: they
count for the layers, not for cycles. An import names the module it imports
(``from pkg import mod`` names ``pkg.mod`` when that is a module, else ``pkg``); the
parent packages that Python initialises on the way are not counted as imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("controlplane", "dataplane", "sdk")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.importer.replace('.', '/')}.py:{self.line}"


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module in ``name``, wherever it stands."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def project_module(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def add(target: str | None, node: ast.stmt, type_only: bool) -> None:
        if target is not None and target != name:
            found.append(Import(name, target, node.lineno, type_only))

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    visit_one(statement, True)
                for statement in child.orelse:
                    visit_one(statement, type_only)
            else:
                visit_one(child, type_only)

    def visit_one(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(project_module(alias.name), node, type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module, up level - 1
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(project_module(submodule if submodule in modules else source), node, type_only)
        visit(node, type_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _graph() -> list[Import]:
    modules = _modules()
    return [i for name, path in modules.items() for i in _imports(name, path, modules)]


def _cycles(edges: list[Import]) -> list[list[Import]]:
    """One cycle (as the imports along it) in each strongly connected component."""
    graph: dict[str, list[Import]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge)
        graph.setdefault(edge.imported, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph[v]:
            w = edge.imported
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first from start, within the component, back to start: a shortest cycle
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        cycle: list[Import] | None = None
        while queue and cycle is None:
            v = queue.pop(0)
            for edge in sorted(graph[v], key=lambda e: e.imported):
                if edge.imported == start:
                    cycle = [*paths[v], edge]
                    break
                if edge.imported in component and edge.imported not in paths:
                    paths[edge.imported] = [*paths[v], edge]
                    queue.append(edge.imported)
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def _describe(cycle: list[Import]) -> str:
    names = " -> ".join([cycle[0].importer, *(e.imported for e in cycle)])
    lines = "".join(f"\n    {e.where()}: imports {e.imported}" for e in cycle)
    return names + lines


def test_no_import_cycles() -> None:
    cycles = _cycles([e for e in _graph() if not e.type_only])
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c) for c in cycles)


def test_the_control_plane_never_imports_the_sdk() -> None:
    wrong = [e for e in _graph() if e.importer.startswith("controlplane") and _is_sdk(e)]
    assert not wrong, "\n".join(f"{e.where()}: imports {e.imported}" for e in wrong)


def test_the_data_plane_never_imports_the_sdk() -> None:
    wrong = [e for e in _graph() if e.importer.startswith("dataplane") and _is_sdk(e)]
    assert not wrong, "\n".join(f"{e.where()}: imports {e.imported}" for e in wrong)


def test_the_data_plane_never_imports_the_control_plane() -> None:
    """The per-node store (segments, the object table, spilling, transfer) does not
    know the log, the schedulers or membership: what it does is reported to its caller."""
    wrong = [
        e
        for e in _graph()
        if e.importer.startswith("dataplane")
        and (e.imported == "controlplane" or e.imported.startswith("controlplane."))
    ]
    assert not wrong, "\n".join(f"{e.where()}: imports {e.imported}" for e in wrong)


def _is_sdk(edge: Import) -> bool:
    return edge.imported == "sdk" or edge.imported.startswith("sdk.")


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A check of the test itself: imports in functions, methods and TYPE_CHECKING
    blocks, relative ones, and ``from package import module``."""
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import pkg.low
if TYPE_CHECKING:
    from pkg.types_only import T
def f():
    from pkg import api
class C:
    def m(self):
        from . import sibling
        from .low import thing
"""
    path = tmp_path / "mod.py"
    path.write_text(source)
    modules = {name: tmp_path for name in ("pkg", "pkg.low", "pkg.types_only", "pkg.api")}
    modules |= {"pkg.sibling": tmp_path, "pkg.mod": path}
    found = {(i.imported, i.line, i.type_only) for i in _imports("pkg.mod", path, modules)}
    assert found == {
        ("pkg.low", 4, False),
        ("pkg.types_only", 6, True),
        ("pkg.api", 8, False),
        ("pkg.sibling", 11, False),
        ("pkg.low", 12, False),
    }
