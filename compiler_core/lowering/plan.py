"""The one lowering loop: which registered entry lowers each node of a graph for a backend."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from compiler_core.errors import ModelcError
from compiler_core.ir import Graph, Node
from compiler_core.lowering.table import FusedPattern, LoweringTable, Match, Pattern

#: Decompositions may decompose into ops that decompose again; deeper than this is a cycle.
MAX_DECOMPOSITION_DEPTH = 8


@dataclass(frozen=True)
class LoweringStep:
    """One unit a backend lowers: a single node, or the nodes a fused pattern matched.

    ``lower(context)`` returns the backend's lowered form, which reads ``inputs`` and writes
    ``outputs`` (IR value names); ``root`` is the node that makes the outputs.
    """

    root: Node
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lower: Callable[[Any], Any]
    #: The fused pattern taken, or None for a node lowered on its own.
    fused: FusedPattern | None = None


def plan_lowering(
    nodes: Sequence[Node], graph: Graph, backend: str, table: LoweringTable, keep: set[str] | None = None
) -> list[LoweringStep]:
    """The steps that lower ``nodes`` (part or all of ``graph``, in order) for ``backend``.

    For each node, in this order of preference: a fused pattern of the backend that matches it
    and the producers it folds in; the backend's lowering of the node's op; the op's
    decomposition, whose nodes are planned the same way. Nodes that only a decomposition lowers
    are decomposed before any pattern is matched, so a pattern may take parts of neighbouring
    composite ops together. A node none of these covers is an error naming the node, its op and
    the backend. ``keep`` holds the values read outside ``nodes`` (default: the graph's outputs
    and whatever the graph's other nodes read); a fused pattern never folds away a node whose
    output is kept.
    """
    if keep is None:
        inside = {id(n) for n in nodes}
        keep = set(graph.outputs) | {v for n in graph.nodes if id(n) not in inside for v in n.inputs}
    return _plan(list(nodes), graph, backend, table, keep, depth=0)


def _decompose(node: Node, graph: Graph, backend: str, table: LoweringTable, depth: int) -> list[Node]:
    """The parts of ``node`` by its op's decomposition (which must exist): errors for a cycle or an
    output the parts do not make."""
    if depth >= MAX_DECOMPOSITION_DEPTH:
        raise ModelcError(
            f"node {node.name}: op {node.op!r} decomposes more than {MAX_DECOMPOSITION_DEPTH} levels deep "
            f"for the {backend} backend (does a decomposition produce the op it decomposes?)"
        )
    parts = list(table.decomposition(node.op).fn(node, graph))
    made = {v for part in parts for v in part.outputs}
    missing = [v for v in node.outputs if v not in made]
    if missing:
        raise ModelcError(f"node {node.name}: the decomposition of op {node.op!r} does not produce {missing[0]!r}")
    return parts


def _expand(nodes: list[Node], graph: Graph, backend: str, table: LoweringTable, depth: int) -> list[Node]:
    """``nodes`` with every node that only a decomposition can lower replaced by its parts, recursively.

    Fused patterns then match across the edges of composite ops: an INT4 linear's GEMM and the GELU
    that reads it are parts of two different nodes until both are expanded. A node whose op roots
    a fused pattern of the backend is left whole, so that pattern can still take it.
    """
    roots = {fused.pattern.op for fused in table.fused_patterns(backend)}
    out: list[Node] = []
    for node in nodes:
        if node.op in roots or table.lowering(node.op, backend) is not None or table.decomposition(node.op) is None:
            out.append(node)
        else:
            out += _expand(_decompose(node, graph, backend, table, depth), graph, backend, table, depth + 1)
    return out


def _plan(
    nodes: list[Node], graph: Graph, backend: str, table: LoweringTable, keep: set[str], depth: int
) -> list[LoweringStep]:
    nodes = _expand(nodes, graph, backend, table, depth)
    matches = _fused_matches(nodes, table.fused_patterns(backend), keep)
    folded = {id(n) for fused, match in matches.values() for n in match.nodes if n is not match.root}
    steps: list[LoweringStep] = []
    for node in nodes:
        if id(node) in folded:
            continue
        if id(node) in matches:
            fused, match = matches[id(node)]
            lower = functools.partial(fused.fn, match)
            steps.append(LoweringStep(node, match.nodes, match.inputs, node.outputs, lower, fused))
            continue
        lowering = table.lowering(node.op, backend)
        if lowering is not None:
            steps.append(LoweringStep(node, (node,), node.inputs, node.outputs, functools.partial(lowering.fn, node)))
            continue
        if table.decomposition(node.op) is None:
            raise ModelcError(f"node {node.name}: no plugin lowers op {node.op!r} for the {backend} backend")
        # A fused pattern's root op that the pattern did not take here.
        parts = _decompose(node, graph, backend, table, depth)
        steps += _plan(parts, graph, backend, table, set(node.outputs) | keep, depth + 1)
    return steps


def _fused_matches(
    nodes: list[Node], patterns: list[FusedPattern], keep: set[str]
) -> dict[int, tuple[FusedPattern, Match]]:
    """Root node id -> the pattern and match that lowers it; each node is in at most one match.

    Roots are tried from the last node back, so a consumer claims its producers before they can
    root smaller matches of their own.
    """
    if not patterns:
        return {}
    producer = {v: n for n in nodes for v in n.outputs}
    uses = Counter(v for n in nodes for v in n.inputs)
    claimed: set[int] = set()
    matches: dict[int, tuple[FusedPattern, Match]] = {}
    for node in reversed(nodes):
        if id(node) in claimed:
            continue
        for fused in patterns:
            found: list[Node] = []
            free: list[str] = []
            named: dict[str, Node] = {}
            if _match(fused.pattern, node, producer, uses, keep, claimed, found, free, named):
                match = Match(node, tuple(reversed(found)), tuple(dict.fromkeys(free)), named)
                if fused.check is not None and not fused.check(match):
                    continue
                matches[id(node)] = (fused, match)
                claimed.update(id(n) for n in found)
                break
    return matches


def _match(
    pattern: Pattern,
    node: Node,
    producer: dict[str, Node],
    uses: Counter,
    keep: set[str],
    claimed: set[int],
    found: list[Node],
    free: list[str],
    named: dict[str, Node],
) -> bool:
    if node.op != pattern.op or len(pattern.inputs) > len(node.inputs):
        return False
    if pattern.where is not None and not pattern.where(node):
        return False
    found.append(node)
    if pattern.name is not None:
        named[pattern.name] = node
    for i, value in enumerate(node.inputs):
        sub = pattern.inputs[i] if i < len(pattern.inputs) else None
        if sub is None:
            free.append(value)
            continue
        source = producer.get(value)
        if (
            source is None
            or id(source) in claimed
            or any(n is source for n in found)
            or len(source.outputs) != 1
            or uses[value] != 1
            or value in keep
        ):
            return False
        if not _match(sub, source, producer, uses, keep, claimed, found, free, named):
            return False
    return True
