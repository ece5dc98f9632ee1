"""The package's import structure: the core never imports the facade (``mixprec.api``,
``mixprec.cli``), and mixprec's modules import each other without cycles.

Every module is read with ``ast`` (nothing is imported). An import of ``mixprec.a.b`` from a
module outside ``mixprec.a`` also runs ``mixprec/a/__init__.py``, so it counts as an import of
``mixprec.a`` too. Imports under ``if TYPE_CHECKING:`` never run and are left out; imports by
name string (``importlib.import_module``: the lazy table of ``mixprec/__init__.py``, the
exporter and model registries) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mixprec

SRC = Path(mixprec.__file__).resolve().parent
FACADE = ("mixprec.api", "mixprec.cli")
#: the modules that may import the facade: the facade itself and the package root
FACADE_IMPORTERS = {"mixprec", "mixprec.api", "mixprec.cli"}

#: Function-level imports that close a cycle, by design: (importer, imported module or package) -> why
LAZY_CYCLES = {
    ("mixprec.data.base", "mixprec.data"):
        "the dataset registry loads its loaders when first asked, and each loader registers itself with it",
    ("mixprec.cost.deployed", "mixprec.export"):
        "FLASH as deployed is the C library's sections, laid out by the C generator, which builds on the cost model",
}


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported mixprec module, line, lazy)`` for each import in the file at ``path``; ``lazy``:
    inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        up = package.split(".")
        base = ".".join((up[:len(up) - node.level + 1] if node.level else []) + ([node.module] if node.module else []))
        # ``from package import name``: the submodule ``name`` where there is one, else the package
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(nodes, lazy: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse, lazy)  # the body never runs
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.extend((t, node.lineno, lazy) for t in targets(node) if t.split(".")[0] == "mixprec")
            else:
                visit(ast.iter_child_nodes(node), lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text(), str(path)).body, False)
    return found


def import_graph(src: Path = SRC) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> ``(imported module, line, lazy)``, parent packages that the import runs included."""
    paths = {module_name(p, src): p for p in src.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = []
        for target, line, lazy in parse_imports(path, name, set(paths)):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                imported = ".".join(parts[:i])
                if imported == target or not (name == imported or name.startswith(imported + ".")):
                    edges.append((imported, line, lazy))
        graph[name] = [e for e in edges if e[0] != name]
    return graph


def allowed(importer: str, imported: str) -> bool:
    return any(importer == a and (imported == b or imported.startswith(b + ".")) for a, b in LAZY_CYCLES)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def edge_sets(graph, lazy: bool, skip_allowed: bool = False) -> dict[str, set[str]]:
    return {m: {t for t, _, is_lazy in edges if (lazy or not is_lazy) and not (skip_allowed and is_lazy and allowed(m, t))}
            for m, edges in graph.items()}


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_only_the_facade_and_user_code_import_the_facade(graph):
    offenders = sorted({f"{m}:{line} imports {t}" for m, edges in graph.items() for t, line, _ in edges
                        if t in FACADE and m not in FACADE_IMPORTERS})
    assert not offenders, "core modules import the facade:\n" + "\n".join(offenders)


def test_module_level_imports_form_no_cycle(graph):
    cycle = find_cycle(edge_sets(graph, lazy=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_close_no_cycle_but_the_allowed_ones(graph):
    cycle = find_cycle(edge_sets(graph, lazy=True, skip_allowed=True))
    assert cycle is None, ("a function-level import closes the cycle " + " -> ".join(cycle) + ": move code so "
                           "the dependency points one way, or add it to LAZY_CYCLES with the reason")


@pytest.mark.parametrize("importer, imported", sorted(LAZY_CYCLES))
def test_each_allowed_lazy_import_exists_is_lazy_and_closes_a_cycle(graph, importer, imported):
    hits = [(t, lazy) for t, _, lazy in graph[importer] if t == imported or t.startswith(imported + ".")]
    assert hits and all(lazy for _, lazy in hits), f"{importer} -> {imported}: no such import, or not in a function"
    edges = edge_sets(graph, lazy=True)
    reach, todo = set(), [t for t, _ in hits]
    while todo:
        node = todo.pop()
        if node not in reach:
            reach.add(node)
            todo.extend(edges.get(node, ()))
    assert importer in reach, f"{importer} -> {imported} closes no cycle any more: remove it from LAZY_CYCLES"


def test_the_checks_see_a_back_edge(tmp_path):
    """The analysis itself: a core module that imports the facade, and a cycle, are caught."""
    pkg = tmp_path / "mixprec"
    (pkg / "cost").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("from .cost.deployed import cost_report\n")
    (pkg / "cost" / "__init__.py").write_text("from .bits import assignment\n")
    (pkg / "cost" / "bits.py").write_text("def assignment():\n    from ..api import cost_report\n")
    (pkg / "cost" / "deployed.py").write_text("from typing import TYPE_CHECKING\nfrom .bits import assignment\n"
                                              "from .. import api\nif TYPE_CHECKING:\n    from ..cli import app\n")
    g = import_graph(pkg)
    assert ("mixprec.api", 2, True) in g["mixprec.cost.bits"]
    assert {t for t, _, _ in g["mixprec.cost.deployed"]} == {"mixprec.cost.bits", "mixprec.api"}  # never runs: no cli
    assert {t for t, _, _ in g["mixprec.api"]} == {"mixprec.cost", "mixprec.cost.deployed"}  # the package runs
    assert find_cycle(edge_sets(g, lazy=False)) == ["mixprec.api", "mixprec.cost.deployed", "mixprec.api"]
    with pytest.raises(AssertionError, match="mixprec.cost.bits:2 imports mixprec.api"):
        test_only_the_facade_and_user_code_import_the_facade(g)
