"""The package's import graph: no import cycle, and no module imports a package ``__init__`` above it.

The graph is built from the source with :mod:`ast` (nothing is imported), so a
cycle is found even where Python would tolerate it at run time.

What counts as an edge ``a -> b``: every ``import``/``from ... import`` in
``a`` that names a module of the package, at module level AND inside
functions or methods (a function-level import is still a dependency: it only
moves the cycle from import time to call time, and hides it from readers).
Imports under ``if TYPE_CHECKING:`` are not edges: they never run, they exist
so that an annotation can name a type without depending on its module
(``hits`` names ``Query`` that way). ``from pkg import name`` is an edge to
the submodule ``pkg.name`` when there is one and ``pkg/__init__.py`` does not
bind ``name`` to something else; otherwise it is an edge to ``pkg`` itself
(its ``__init__``).
"""

from __future__ import annotations

import ast
import graphlib
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dask_fp"


@dataclass(frozen=True)
class Edge:
    """One import: importing module, imported module, line, and where it stands."""

    source: str
    target: str
    line: int
    where: str  # "module" or "function"


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every ``.py`` file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement that runs, with "module" or "function"; TYPE_CHECKING blocks skipped."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:  # the ``else:`` branch does run
                    visit_stmt(c, where)
                continue
            visit_stmt(child, where)

    def visit_stmt(child: ast.AST, where: str) -> None:
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append((child, where))
        inner = "function" if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else where
        visit(child, inner)

    visit(tree, "module")
    return found


def import_graph(root: Path) -> tuple[set[str], list[Edge]]:
    """The modules of the package at ``root`` and every run-time import between them."""
    mods = modules(root)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, (path, _) in mods.items()}
    rebound = {name: _rebinds(trees[name]) for name, (_, is_pkg) in mods.items() if is_pkg}
    top = root.name
    edges: list[Edge] = []
    for name, (_, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        for node, where in _imports(trees[name]):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - node.level + 1]
                    if not base:
                        raise ValueError(f"{name}:{node.lineno}: relative import beyond the top package")
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = []
                for a in node.names:
                    sub = f"{pkg}.{a.name}"
                    # ``from pkg import x``: the submodule x, unless pkg/__init__.py binds x to something else
                    targets.append(sub if sub in mods and a.name not in rebound.get(pkg, set()) else pkg)
            for t in targets:
                if (t == top or t.startswith(top + ".")) and t != name:
                    if t not in mods:
                        raise ValueError(f"{name}:{node.lineno}: imports {t}, which is not a module of {top}")
                    edges.append(Edge(name, t, node.lineno, where))
    return set(mods), edges


def _rebinds(init: ast.Module) -> set[str]:
    """Names an ``__init__`` binds to something other than the submodule of that name."""
    out = set()
    for node in init.body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                name = a.asname or a.name
                # ``from .classify import classify`` binds the function, not the submodule
                if not (node.level == 1 and node.module is None and a.asname is None):
                    out.add(name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def find_cycle(nodes: set[str], edges: list[Edge]) -> list[str] | None:
    """One import cycle, each module importing the next (first == last), or None.

    Found with :class:`graphlib.TopologicalSorter` (the standard library's).
    """
    deps: dict[str, set[str]] = {n: set() for n in nodes}
    for e in edges:
        deps[e.source].add(e.target)
    try:
        graphlib.TopologicalSorter(deps).prepare()
    except graphlib.CycleError as err:
        # graphlib lists each node before the nodes that depend on it; reversed: a imports the next
        return list(reversed(err.args[1]))
    return None


def describe_cycle(cycle: list[str], edges: list[Edge]) -> str:
    """The import statements that close a cycle, one per line."""
    by_pair = {(e.source, e.target): e for e in edges}
    lines = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        e = by_pair[(a, b)]
        lines.append(f"  {e.source} (line {e.line}, {e.where} level) imports {e.target}")
    return "\n".join(lines)


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Imports of a package ``__init__`` from a module inside that package."""
    return [e for e in edges if e.source.startswith(e.target + ".")]


# ----------------------------------------------------------------------------- the package


def test_the_package_has_no_import_cycle():
    nodes, edges = import_graph(PACKAGE)
    # the graph is real: known imports at module and at function level are found
    assert Edge("dask_fp.ingest", "dask_fp.pipeline", _line(edges, "dask_fp.ingest", "dask_fp.pipeline"),
                "module") in edges
    assert any(e.source == "dask_fp.cli" and e.where == "function" for e in edges)
    cycle = find_cycle(nodes, edges)
    assert cycle is None, "import cycle " + " -> ".join(cycle or []) + ":\n" + describe_cycle(cycle or [], edges)


def test_no_module_imports_a_package_init_above_it():
    _, edges = import_graph(PACKAGE)
    bad = upward_imports(edges)
    assert not bad, "modules import the package __init__ above them (import from the module that defines" \
        " the name instead):\n" + "\n".join(f"  {e.source} line {e.line} imports {e.target}" for e in bad)


def _line(edges: list[Edge], source: str, target: str) -> int:
    return next(e.line for e in edges if e.source == source and e.target == target and e.where == "module")


# ----------------------------------------------------------------------------- the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # a function-level import closes the cycle
        ({"__init__.py": "", "a.py": "from .b import g\n", "b.py": "def g():\n    from .a import f\n"},
         {"pkg.a", "pkg.b"}),
        # three modules, absolute imports
        ({"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "from pkg import c\n", "c.py": "from pkg.a import x\n"},
         {"pkg.a", "pkg.b", "pkg.c"}),
        # through a subpackage: ``from .. import a`` from pkg/sub/s.py
        ({"__init__.py": "", "a.py": "from .sub.s import y\n", "sub/__init__.py": "", "sub/s.py": "from .. import a\n"},
         {"pkg.a", "pkg.sub.s"}),
    ],
    ids=["function-level", "absolute-three", "subpackage"],
)
def test_checker_finds_cycles(tmp_path, files, cycle):
    nodes, edges = import_graph(_package(tmp_path, files))
    found = find_cycle(nodes, edges)
    assert found is not None and set(found) == cycle and found[0] == found[-1]
    assert describe_cycle(found, edges).count("imports") == len(cycle)


def test_checker_ignores_type_checking_imports_and_accepts_a_dag(tmp_path):
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "from typing import TYPE_CHECKING\nfrom .b import g\nif TYPE_CHECKING:\n    from .c import C\n",
        "b.py": "import os\n",
        "c.py": "from .a import f\n",
    }
    nodes, edges = import_graph(_package(tmp_path, files))
    assert find_cycle(nodes, edges) is None
    assert {(e.source, e.target) for e in edges} == {("pkg", "pkg.a"), ("pkg.a", "pkg.b"), ("pkg.c", "pkg.a")}


def test_checker_finds_imports_of_a_package_init(tmp_path):
    files = {
        "__init__.py": "from .core import run\nfrom . import tools\n",
        "core.py": "def run():\n    pass\n",
        "tools.py": "",
        "sub/__init__.py": "X = 1\n",
        "sub/deep.py": "def h():\n    import pkg\n",  # the top package, at function level
        "sub/other.py": "from . import X\n",  # the subpackage's own __init__
        "sub/fine.py": "from . import deep\nfrom .. import tools\n",  # submodules: not upward
        "sub/name.py": "from .. import run\n",  # a name bound in pkg/__init__.py
    }
    _, edges = import_graph(_package(tmp_path, files))
    got = {(e.source, e.target) for e in upward_imports(edges)}
    assert got == {("pkg.sub.deep", "pkg"), ("pkg.sub.other", "pkg.sub"), ("pkg.sub.name", "pkg")}
