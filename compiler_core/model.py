"""From a checkpoint config to the IR graph of each rank."""

from __future__ import annotations

from typing import Any

from compiler_core.errors import UsageError
from compiler_core.ir import Graph, validate
from compiler_core.mapping import Mapping
from compiler_core.registry import get_registry


def rank_graph(config: dict[str, Any], rank: int, source: str = "config.json") -> Graph:
    """Build and validate rank ``rank``'s graph, quantized as ``config["quantization"]`` says."""
    registry = get_registry()
    arch = registry.architecture(config["architecture"], source)
    mapping = Mapping.from_json(config["mapping"], source)
    try:
        arch.check_mapping(config, mapping)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    graph = arch.build_graph(config, mapping, rank, config["dtype"])
    for scheme in registry.quant_schemes.values():
        graph = scheme.transform_graph(graph, config)
    return validate(graph, registry.ops)
