"""The layer-graph IR: parameters, nodes and the graph that holds them.

A graph is one rank's program. Values are named tensors; each node reads named values, writes
named values and refers to its parameters by role (``{"weight": "layers.0.mlp.fc.weight"}``).
Everything is immutable and JSON-serialisable, so a graph can be stored in an engine's
config.json and read back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

IR_VERSION = 1


@dataclass(frozen=True)
class Param:
    """A named weight with its shape and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """``{"name", "shape", "dtype"}``."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Param:
        """Read what :meth:`to_json` wrote."""
        return cls(data["name"], tuple(int(d) for d in data["shape"]), data["dtype"])

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Node:
    """One operation: ``outputs = op(inputs, params; attrs)``."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: Mapping[str, str] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Node:
        """A copy with ``changes`` applied (nodes are immutable)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """``{"name", "op", "inputs", "outputs", "params", "attrs"}``."""
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "params": dict(self.params),
            "attrs": dict(self.attrs),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Node:
        """Read what :meth:`to_json` wrote (``params`` and ``attrs`` may be absent)."""
        return cls(
            name=data["name"],
            op=data["op"],
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            params=dict(data.get("params", {})),
            attrs=dict(data.get("attrs", {})),
        )


@dataclass(frozen=True)
class Graph:
    """One rank's program: inputs, nodes in execution order, outputs and parameters.

    ``attrs`` carries model-level facts the runtime needs (vocab size, number of KV-cache
    slots, dtype, the rank's position in the mapping).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[Node, ...]
    params: Mapping[str, Param]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Graph:
        """A copy with ``changes`` applied (graphs are immutable)."""
        return replace(self, **changes)

    def node(self, name: str) -> Node:
        """The node called ``name``; KeyError when there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def nodes_of(self, *ops: str) -> Iterator[Node]:
        """The nodes whose op is one of ``ops``, in execution order."""
        return (n for n in self.nodes if n.op in ops)

    def users_of_param(self, param_name: str) -> list[tuple[Node, str]]:
        """Every (node, role) that reads ``param_name``."""
        return [(n, role) for n in self.nodes for role, p in n.params.items() if p == param_name]

    def is_padded(self, param_name: str) -> bool:
        """Whether ``param_name`` may be zero-padded past the model's size when it is split.

        A graph declares such parameters (a vocabulary padded to a multiple of tp_size) in its
        ``padded_params`` attribute. The other parameters of a node that reads a declared one
        share its padding, so a quantized weight's scales are padded with the weight.
        """
        declared = set(self.attrs.get("padded_params") or ())
        if param_name in declared:
            return True
        return any(declared & set(node.params.values()) for node, _ in self.users_of_param(param_name))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what engines store in config.json), tagged with the IR version."""
        return {
            "ir_version": IR_VERSION,
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "attrs": dict(self.attrs),
            "params": [p.to_json() for p in self.params.values()],
            "nodes": [n.to_json() for n in self.nodes],
        }

    def dumps(self) -> str:
        """:meth:`to_json` as indented JSON text."""
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Graph:
        """Read a graph written by :meth:`to_json`; a malformed one raises ValueError naming the field."""
        version = data.get("ir_version")
        if version != IR_VERSION:
            raise ValueError(f"IR version {version!r} is not supported (this modelc reads {IR_VERSION})")
        try:
            return cls(
                name=data["name"],
                inputs=tuple(data["inputs"]),
                outputs=tuple(data["outputs"]),
                nodes=tuple(Node.from_json(n) for n in data["nodes"]),
                params={p["name"]: Param.from_json(p) for p in data["params"]},
                attrs=dict(data.get("attrs", {})),
            )
        except KeyError as exc:
            raise ValueError(f"IR JSON: field {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"IR JSON: malformed ({exc})") from None


class GraphBuilder:
    """Appends nodes and parameters while naming intermediate values uniquely."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[Node] = []
        self.params: dict[str, Param] = {}
        self._counter = 0

    def param(self, name: str, shape: Iterable[int], dtype: str) -> str:
        """Declare a parameter (again, identically, is fine: shared weights) and return its name."""
        shape = tuple(int(d) for d in shape)
        existing = self.params.get(name)
        if existing is not None and (existing.shape != shape or existing.dtype != dtype):
            raise ValueError(f"parameter {name} declared twice with different shape or dtype")
        self.params[name] = Param(name, shape, dtype)
        return name

    def add(
        self,
        op: str,
        inputs: Iterable[str],
        *,
        name: str,
        params: Mapping[str, str] | None = None,
        num_outputs: int = 1,
        **attrs: Any,
    ) -> str | tuple[str, ...]:
        """Append a node; return its output value name (a tuple when ``num_outputs`` > 1).

        Outputs are named after the node (``{name}.out``), so node names must be unique.
        """
        outputs = tuple(f"{name}.out{i}" if num_outputs > 1 else f"{name}.out" for i in range(num_outputs))
        self.nodes.append(Node(name, op, tuple(inputs), outputs, dict(params or {}), dict(attrs)))
        return outputs if num_outputs > 1 else outputs[0]

    def build(self, inputs: Iterable[str], outputs: Iterable[str], attrs: Mapping[str, Any] | None = None) -> Graph:
        """The graph built so far (not validated: call :func:`compiler_core.ir.validate`)."""
        return Graph(self.name, tuple(inputs), tuple(outputs), tuple(self.nodes), dict(self.params), dict(attrs or {}))
