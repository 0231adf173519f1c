"""The one place that says what a well-formed graph is."""

from __future__ import annotations

from collections.abc import Mapping

from compiler_core.dtypes import IR_DTYPES
from compiler_core.ir.graph import Graph
from compiler_core.ir.ops import OpSpec


class GraphError(ValueError):
    """A graph breaks a rule of the IR; the message names the node, value or parameter."""


def validate(graph: Graph, ops: Mapping[str, OpSpec]) -> Graph:
    """Check ``graph`` against the op signatures in ``ops``; return it unchanged or raise GraphError."""
    defined: set[str] = set()
    for name in graph.inputs:
        if name in defined:
            raise GraphError(f"graph {graph.name}: input {name!r} is listed twice")
        defined.add(name)

    for pname, param in graph.params.items():
        if pname != param.name:
            raise GraphError(f"graph {graph.name}: parameter key {pname!r} holds parameter {param.name!r}")
        if param.dtype not in IR_DTYPES:
            raise GraphError(f"parameter {pname}: dtype {param.dtype!r} is not one of {', '.join(IR_DTYPES)}")
        if any(not _is_int(d) or d <= 0 for d in param.shape):
            raise GraphError(f"parameter {pname}: shape {list(param.shape)} must be positive integers")

    seen_nodes: set[str] = set()
    used_params: set[str] = set()
    for node in graph.nodes:
        where = f"node {node.name} ({node.op})"
        if node.name in seen_nodes:
            raise GraphError(f"{where}: the name is used by an earlier node")
        seen_nodes.add(node.name)
        spec = ops.get(node.op)
        if spec is None:
            raise GraphError(f"{where}: unknown op {node.op!r}; no loaded plugin registers it")
        lo, hi = spec.num_inputs
        if not lo <= len(node.inputs) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise GraphError(f"{where}: takes {want} inputs, got {len(node.inputs)}")
        if len(node.outputs) != spec.num_outputs:
            raise GraphError(f"{where}: makes {spec.num_outputs} outputs, got {len(node.outputs)}")
        for value in node.inputs:
            if value not in defined:
                raise GraphError(f"{where}: input {value!r} is not a graph input or an earlier node's output")
        for value in node.outputs:
            if value in defined:
                raise GraphError(f"{where}: output {value!r} is already defined")
            defined.add(value)
        for role in spec.params:
            if role not in node.params:
                raise GraphError(f"{where}: missing parameter role {role!r}")
        allowed_roles = set(spec.params) | set(spec.optional_params)
        for role, pname in node.params.items():
            if role not in allowed_roles:
                raise GraphError(f"{where}: unexpected parameter role {role!r}")
            if pname not in graph.params:
                raise GraphError(f"{where}: parameter {pname!r} ({role}) is not declared in the graph")
            used_params.add(pname)
        for attr in spec.attrs:
            if attr not in node.attrs:
                raise GraphError(f"{where}: missing attribute {attr!r}")
        allowed_attrs = set(spec.attrs) | set(spec.optional_attrs)
        for attr, value in node.attrs.items():
            if attr not in allowed_attrs:
                raise GraphError(f"{where}: unexpected attribute {attr!r}")
            if not _is_json(value):
                raise GraphError(f"{where}: attribute {attr!r} holds a {type(value).__name__}, which JSON cannot store")

    for attr, value in graph.attrs.items():
        if not _is_json(value):
            raise GraphError(
                f"graph {graph.name}: attribute {attr!r} holds a {type(value).__name__}, which JSON cannot store"
            )
    for value in graph.outputs:
        if value not in defined:
            raise GraphError(f"graph {graph.name}: output {value!r} is never produced")
    unused = sorted(set(graph.params) - used_params)
    if unused:
        raise GraphError(f"graph {graph.name}: parameter {unused[0]!r} is declared but no node reads it")
    return graph


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_json(value: object) -> bool:
    """True for values a graph can store in config.json and read back (tuples come back as lists)."""
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False
