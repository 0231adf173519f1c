"""Meta-test: the core's modules import each other without a cycle.

Every import of a ``compiler_core`` module counts, at module level or inside a function, so a
cycle cannot hide behind a function-level import; only ``if TYPE_CHECKING:`` blocks (never run)
are left out. Importing ``compiler_core.a.b`` also imports the package ``compiler_core.a``, so that
edge counts too. Modules are parsed with ``ast``, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import compiler_core

CORE = Path(compiler_core.__file__).resolve().parent


def modules_under(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package at ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def core_modules() -> dict[str, Path]:
    return modules_under(CORE)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name ``tree`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)  # ``from pkg import module``
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the core modules importing it runs first (its imports and their parent packages)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for target in imported_names(tree, name, path.name == "__init__.py"):
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {m for m in edges & set(modules) if m != name and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_core_import_graph_has_no_cycle():
    modules = core_modules()
    assert {"compiler_core.api", "compiler_core.registry", "compiler_core.cli"} <= set(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_plugin_facing_types_live_in_a_leaf_module():
    """``compiler_core.api`` needs only the IR (with its dtype table), the mapping and the errors, never
    the host, the registry or the runtime."""
    graph = import_graph(core_modules())
    reachable, todo = set(), ["compiler_core.api"]
    while todo:
        for nxt in graph[todo.pop()] - reachable:
            reachable.add(nxt)
            todo.append(nxt)
    assert reachable <= {
        "compiler_core",
        "compiler_core.hookspecs",
        "compiler_core.errors",
        "compiler_core.mapping",
        "compiler_core.dtypes",
    } | {m for m in reachable if m.startswith("compiler_core.ir")}


def test_the_detector_sees_function_level_imports_and_skips_type_checking(tmp_path):
    """The detector itself: a cycle through a function-level import is found, one through
    ``if TYPE_CHECKING:`` is not."""
    pkg = tmp_path / "compiler_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from compiler_core import b\n")
    (pkg / "b.py").write_text("def f():\n    from compiler_core.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from compiler_core import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    modules = modules_under(pkg)
    graph = import_graph(modules)
    assert find_cycle(graph) == ["compiler_core.a", "compiler_core.b", "compiler_core.a"]
    assert graph["compiler_core.c"] == set()
    assert graph["compiler_core.d"] == {"compiler_core.c"}
    (pkg / "b.py").write_text("X = 1\n")
    assert find_cycle(import_graph(modules)) is None
