"""Human-readable listing of a graph, used by ``modelc inspect``."""

from __future__ import annotations

from collections import Counter

from compiler_core.ir.graph import Graph


def format_graph(graph: Graph, *, max_nodes: int | None = None) -> str:
    """Return a text listing: header, op histogram, parameters summary and the node list."""
    total = sum(p.numel for p in graph.params.values())
    by_dtype = Counter()
    for p in graph.params.values():
        by_dtype[p.dtype] += p.numel
    lines = [
        f"graph {graph.name}: {len(graph.nodes)} nodes, {len(graph.params)} params ({total:,} elements)",
        "  inputs:  " + ", ".join(graph.inputs),
        "  outputs: " + ", ".join(graph.outputs),
        "  param dtypes: " + ", ".join(f"{d}={n:,}" for d, n in sorted(by_dtype.items())),
        "  ops: " + ", ".join(f"{op}×{n}" for op, n in sorted(Counter(n.op for n in graph.nodes).items())),
    ]
    if graph.attrs:
        lines.append("  attrs: " + ", ".join(f"{k}={v}" for k, v in sorted(graph.attrs.items())))
    nodes = graph.nodes if max_nodes is None else graph.nodes[:max_nodes]
    for node in nodes:
        params = " ".join(
            f"{role}={graph.params[p].dtype}{list(graph.params[p].shape)}" for role, p in node.params.items()
        )
        attrs = " ".join(f"{k}={v}" for k, v in node.attrs.items())
        lhs = ", ".join(node.outputs)
        rhs = ", ".join(node.inputs)
        lines.append(f"  %{lhs} = {node.op}({rhs}) {params} {attrs}".rstrip() + f"  # {node.name}")
    if max_nodes is not None and len(graph.nodes) > max_nodes:
        lines.append(f"  ... {len(graph.nodes) - max_nodes} more nodes")
    return "\n".join(lines)
