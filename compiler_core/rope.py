"""Rotary position embedding as the core's attention kernels implement it, for every backend.

An ``attention`` node with ``position_embedding="rope"`` rotates the first ``rotary_dim``
channels of each query and key head (GPT-NeoX rotate-half) by ``position * inv_freq``:

* ``rope_inv_freq``: the inverse frequencies themselves (``rotary_dim / 2`` floats). This is how
  an architecture brings any scaling the kernels do not know (Llama 3's, YaRN, ...): it computes
  the frequencies once when building the graph, and every backend uses them as they are.
* otherwise ``1 / rope_theta ** (2i / rotary_dim)``, with the ``rope_scaling`` types of
  :data:`SCALING_TYPES` applied (``linear``: positions divided by ``factor``).

Any other ``rope_scaling`` would be ignored by the kernels and give wrong logits without a word,
so :func:`check_rope` refuses it when the graph is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compiler_core.errors import UsageError
from compiler_core.ir import Graph

#: ``rope_scaling`` types the attention kernels apply themselves.
SCALING_TYPES = ("linear",)
DEFAULT_THETA = 10000.0


def scaling_type(scaling: Mapping[str, Any] | None) -> str | None:
    """The ``rope_type`` (or legacy ``type``) of a ``rope_scaling`` dict; None for no scaling."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind == "default" else kind


def inv_freq(attrs: Mapping[str, Any]) -> torch.Tensor:
    """The float32 inverse frequencies ``[rotary_dim / 2]`` of an attention node's attributes."""
    given = attrs.get("rope_inv_freq")
    if given is not None:
        return torch.tensor(given, dtype=torch.float32)
    dim = int(attrs.get("rotary_dim", attrs["head_dim"]))
    theta = float(attrs.get("rope_theta", DEFAULT_THETA))
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def position_divisor(attrs: Mapping[str, Any]) -> float | None:
    """What positions are divided by before the rotation (``linear`` scaling), or None."""
    scaling = attrs.get("rope_scaling")
    return float(scaling["factor"]) if scaling_type(scaling) == "linear" else None


def check_rope(graph: Graph, source: str) -> None:
    """Raise UsageError naming the node and value when an attention node's rotary settings are
    ones the kernels would not apply as written."""
    for node in graph.nodes_of("attention"):
        a = node.attrs
        if a.get("position_embedding") != "rope":
            continue
        where = f"{source}: node {node.name}"
        kind = scaling_type(a.get("rope_scaling"))
        if kind is not None and kind not in SCALING_TYPES:
            raise UsageError(
                f"{where}: rope_scaling type {kind!r} is not implemented by the attention kernels "
                f"(implemented: {', '.join(SCALING_TYPES)}); an architecture passes any other scaling as "
                "precomputed frequencies in attribute 'rope_inv_freq'"
            )
        if kind == "linear":
            factor = a["rope_scaling"].get("factor")
            if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 0:
                raise UsageError(f"{where}: rope_scaling factor must be a positive number, got {factor!r}")
        dim = int(a.get("rotary_dim", a["head_dim"]))
        given = a.get("rope_inv_freq")
        if given is not None:
            if kind is not None:
                raise UsageError(f"{where}: give either rope_inv_freq or rope_scaling, not both")
            if not isinstance(given, list | tuple) or len(given) != dim // 2:
                raise UsageError(f"{where}: rope_inv_freq must hold rotary_dim / 2 = {dim // 2} numbers")
            if not all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in given):
                raise UsageError(f"{where}: rope_inv_freq must hold positive numbers")
