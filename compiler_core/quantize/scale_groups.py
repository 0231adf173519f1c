"""Which linears share an input, for activation-aware schemes (AWQ): the architecture's word, else the graph's.

An architecture names its groups with its ``scale_groups`` method. One that does not still gets
activation-aware scaling: the groups are derived from the graph, one per producer whose output
feeds linears directly, so a new family needs no hook to be quantized well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compiler_core.api import Architecture, ScaleGroup
from compiler_core.ir import Graph, OpSpec

#: OpSpec tags of the nodes a derived group may start from: a weight (norm, linear) can absorb
#: the scale, an activation keeps it as a multiply on the linears' input.
PRODUCER_TAGS = frozenset({"norm", "activation", "linear"})
#: ``source`` values of :func:`scale_groups_for`.
FROM_ARCHITECTURE = "architecture"
FROM_GRAPH = "graph"


def derive_scale_groups(graph: Graph, ops: Mapping[str, OpSpec]) -> list[ScaleGroup]:
    """One group per producer (a norm, activation or linear, by its op's tags, whose output is not
    a graph output) holding the ``linear`` nodes that read that output, in graph order."""
    producers = {out: node for node in graph.nodes for out in node.outputs}
    groups: dict[str, list[str]] = {}
    for node in graph.nodes_of("linear"):
        value = node.inputs[0]
        producer = producers.get(value)
        if producer is None or value in graph.outputs:
            continue
        spec = ops.get(producer.op)
        if spec is not None and spec.tags & PRODUCER_TAGS:
            groups.setdefault(producer.name, []).append(node.name)
    return [ScaleGroup(producer, tuple(linears)) for producer, linears in groups.items()]


def scale_groups_for(
    arch: Architecture, graph: Graph, config: dict[str, Any], ops: Mapping[str, OpSpec]
) -> tuple[list[ScaleGroup], str]:
    """The groups for ``graph`` and where they came from (``FROM_ARCHITECTURE`` or ``FROM_GRAPH``).

    ``config`` is the checkpoint config's family section (``CheckpointConfig.model``)."""
    named = arch.scale_groups(graph, config)
    if named is not None:
        return list(named), FROM_ARCHITECTURE
    return derive_scale_groups(graph, ops), FROM_GRAPH


def describe_scale_groups(groups: list[ScaleGroup], source: str) -> dict[str, Any]:
    """The JSON record of the groups used (a checkpoint's ``quantization.scale_groups``)."""
    return {"source": source, "groups": {g.producer: list(g.linears) for g in groups}}
