"""What plugins register through ``register_lowerings``, and the table the core builds from it.

Three kinds of entry, each keyed so that two plugins cannot claim the same thing:

* :class:`Lowering` ``(op, backend)``: how one backend runs one op.
* :class:`Decomposition` ``(op)``: a rewrite of an op into other ops, ultimately core primitives
  (``quantize``, ``dequantize``, ``matmul``, ...), which lets every backend that lowers the
  primitives run the op with no code of its own for it.
* :class:`FusedPattern` ``(name, backend)``: a backend's fast kernel for a small tree of ops (an op
  itself, or the primitives a decomposition produces), taken instead of lowering them one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from compiler_core.ir import Graph, Node


@dataclass(frozen=True)
class Lowering:
    """Backend ``backend`` runs op ``op`` with ``fn(node, context)``.

    ``context`` is the backend's lowering context and the result is the backend's lowered form:
    for ``torch`` a :class:`compiler_core.backends.torch.kernels.TorchLowering` and a kernel
    ``fn(ctx, *inputs) -> output``; for ``onnx`` an ``OnnxLowering`` and the ONNX names of the
    node's outputs.
    """

    op: str
    backend: str
    fn: Callable[[Node, Any], Any]


@dataclass(frozen=True)
class Decomposition:
    """Op ``op`` means the nodes ``fn(node, graph)`` returns.

    The nodes read ``node``'s inputs, parameters (by name) and each other's outputs, and the last
    ones write ``node``'s outputs. Their names should start with ``node.name`` so that errors
    and ONNX node names still point at the original node. A backend without a lowering of its own
    for ``op`` lowers these nodes instead (decomposing them further where needed).
    """

    op: str
    fn: Callable[[Node, Graph], Sequence[Node]]


@dataclass(frozen=True)
class Pattern:
    """A tree of ops to match, rooted at the node that produces the fused result.

    ``inputs[i]`` is the pattern the producer of the node's i-th input must match (its output then
    feeds nothing else and is folded into the fused kernel), or None for any value (the fused
    kernel receives it as an input); inputs beyond ``inputs`` are always free. ``where`` further
    restricts the node (dtypes, scale granularity, ...). ``name`` labels the matched node for
    :meth:`Match.node`.
    """

    op: str
    inputs: tuple[Pattern | None, ...] = ()
    where: Callable[[Node], bool] | None = None
    name: str | None = None

    @property
    def size(self) -> int:
        """Number of nodes the pattern covers."""
        return 1 + sum(p.size for p in self.inputs if p is not None)


@dataclass(frozen=True)
class Match:
    """Nodes a :class:`Pattern` matched: ``root`` makes the outputs, ``inputs`` are the free inputs."""

    root: Node
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    named: dict[str, Node] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        """The node matched by the sub-pattern labelled ``name``."""
        return self.named[name]


@dataclass(frozen=True)
class FusedPattern:
    """Backend ``backend`` runs whatever ``pattern`` matches with ``fn(match, context)``.

    The result is the backend's lowered form of the match as a whole (for ``torch`` a kernel
    ``fn(ctx, *match.inputs)``); it must compute what lowering the matched nodes one by one would.
    ``name`` identifies the pattern in ``modelc plugins`` and in duplicate-registration errors.
    """

    name: str
    backend: str
    pattern: Pattern
    fn: Callable[[Match, Any], Any]
    #: A condition on the whole match (two nodes sharing a scale, say); None accepts every match.
    check: Callable[[Match], bool] | None = None


Entry = Lowering | Decomposition | FusedPattern


def registration_key(entry: object) -> tuple[str, str]:
    """(kind, name) under which ``entry`` is registered; TypeError for anything else.

    Kinds are "lowerings", "decompositions" and "fused_patterns"; names are ``backend:op``,
    ``op`` and ``backend:name``, which is how ``modelc plugins`` lists them.
    """
    if isinstance(entry, Lowering):
        return "lowerings", f"{entry.backend}:{entry.op}"
    if isinstance(entry, Decomposition):
        return "decompositions", entry.op
    if isinstance(entry, FusedPattern):
        return "fused_patterns", f"{entry.backend}:{entry.name}"
    raise TypeError(f"{type(entry).__name__} is not a Lowering, Decomposition or FusedPattern")


class LoweringTable:
    """Every registered lowering, decomposition and fused pattern, looked up by op and backend."""

    def __init__(self, entries: Sequence[Entry] = ()) -> None:
        self._lowerings: dict[tuple[str, str], Lowering] = {}
        self._decompositions: dict[str, Decomposition] = {}
        self._fused: dict[str, list[FusedPattern]] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: Entry) -> None:
        """Add one entry (the registry has already refused duplicates, naming both plugins)."""
        if isinstance(entry, Lowering):
            self._lowerings[(entry.op, entry.backend)] = entry
        elif isinstance(entry, Decomposition):
            self._decompositions[entry.op] = entry
        else:
            patterns = self._fused.setdefault(entry.backend, [])
            patterns.append(entry)
            # Larger patterns first: a kernel covering more of the graph wins over one covering part of it.
            patterns.sort(key=lambda p: -p.pattern.size)

    def entries(self) -> list[Entry]:
        """Every entry: lowerings, decompositions, then fused patterns (e.g. to build a table without some)."""
        fused = [p for patterns in self._fused.values() for p in patterns]
        return [*self._lowerings.values(), *self._decompositions.values(), *fused]

    def lowering(self, op: str, backend: str) -> Lowering | None:
        """The backend's own lowering of ``op``, if it has one."""
        return self._lowerings.get((op, backend))

    def decomposition(self, op: str) -> Decomposition | None:
        """The registered decomposition of ``op``, if any."""
        return self._decompositions.get(op)

    def fused_patterns(self, backend: str) -> list[FusedPattern]:
        """The backend's fused patterns, largest first."""
        return self._fused.get(backend, [])
