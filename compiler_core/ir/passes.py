"""Graph passes run as a flat, named sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from compiler_core.ir.graph import Graph

Pass = Callable[[Graph], Graph]


def run_passes(graph: Graph, passes: Sequence[tuple[str, Pass]], *, check: Callable[[Graph], Graph]) -> Graph:
    """Apply each named pass in order, validating after every one so a broken pass is named."""
    for name, fn in passes:
        try:
            graph = check(fn(graph))
        except ValueError as exc:
            raise ValueError(f"after pass {name!r}: {exc}") from exc
    return graph


def drop_unused_params(graph: Graph) -> Graph:
    """Remove parameters that no node reads."""
    used = {p for n in graph.nodes for p in n.params.values()}
    return graph.replace(params={k: v for k, v in graph.params.items() if k in used})
