"""Runs a graph step by step with kernels from the lowering table (:mod:`compiler_core.lowering`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from compiler_core.backends.torch.cpu_linear import held_for_cpu
from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.dtypes import torch_dtype
from compiler_core.errors import ModelcError
from compiler_core.ir import Graph, Node, OpSpec
from compiler_core.lowering import LoweringTable, plan_lowering
from compiler_core.registry import Registry
from compiler_core.runtime.context import ForwardContext, KVCache

#: Core ops that treat every position on its own (no mixing along the sequence axis).
POSITIONWISE_OPS = frozenset(
    {
        *("embedding", "layer_norm", "rms_norm", "linear", "bias_add", "gelu", "relu", "silu", "add", "mul"),
        *("all_reduce", "matmul", "channel_scale"),
    }
)
#: OpSpec tags that mark a plugin's op as position-wise (quantized linears, ...).
POSITIONWISE_TAGS = frozenset({"linear", "quantized_linear", "positionwise"})


class GraphExecutor:
    """The torch reference executor for one rank's graph.

    Kernels come from ``lowerings`` (default ``registry.lowerings``) for ``backend="torch"``, so a plugin's op (a
    quantized linear, say) runs here exactly like a core op: through its own torch lowering, a
    fused pattern, or its decomposition into core primitives. Intermediate values are dropped
    after their last use. ``weights`` are the rank's weights as held in memory: on CPU, a float32
    weight whose values are all bfloat16 numbers may be held as bfloat16 (see ``held_for_cpu``).
    """

    def __init__(
        self,
        registry: Registry,
        graph: Graph,
        weights: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        lowerings: LoweringTable | None = None,
    ):
        self.graph = graph
        self.device = torch.device(device)
        self.dtype = torch_dtype(graph.attrs.get("dtype", "float32"))
        missing = [p for p in graph.params if p not in weights]
        if missing:
            raise ModelcError(f"graph {graph.name}: no weight for parameter {missing[0]!r}")
        self.weights = _held_weights(weights, graph.params, self.device)
        lowering = TorchLowering(self.weights, self.device, graph)
        table = registry.lowerings if lowerings is None else lowerings
        self.steps = plan_lowering(graph.nodes, graph, "torch", table)
        self.kernels = [step.lower(lowering) for step in self.steps]
        last_use: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for value in step.inputs:
                last_use[value] = i
        keep = set(graph.outputs)
        self._free_after = [
            [v for v in step.inputs if last_use[v] == i and v not in keep] for i, step in enumerate(self.steps)
        ]
        # Values computed from weights alone (a dequantized weight): no positions to cut.
        self._weight_values: set[str] = set()
        for step in self.steps:
            if all(v in self._weight_values for v in step.inputs):
                self._weight_values.update(step.outputs)
        # Everything after step `_tail_start - 1` is position-wise (ln_f, lm_head, the last MLP...):
        # when only the last position's output is wanted, the live values are cut to it there.
        self._tail_start = 0
        for i, step in enumerate(self.steps):
            if not all(_positionwise(node, registry.ops) for node in step.nodes):
                self._tail_start = i + 1

    def cache_specs(self) -> dict[str, dict[str, Any]]:
        """KV-cache slot shapes and storage types declared by the graph's attention nodes."""
        specs = {}
        for node in self.graph.nodes_of("attention"):
            a = node.attrs
            scale_name = node.params.get("kv_cache_scaling_factor")
            specs[a["cache_slot"]] = {
                "num_kv_heads": int(a["num_kv_heads"]),
                "head_dim": int(a["head_dim"]),
                "dtype": torch_dtype(a.get("kv_cache_dtype", self.graph.attrs.get("dtype", "float32"))),
                "scale": None if scale_name is None else self.weights[scale_name].float().reshape(()),
            }
        return specs

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.cache_specs(), batch, max_len, self.device)

    def run(
        self, inputs: Mapping[str, torch.Tensor], ctx: ForwardContext, last_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """Outputs for ``inputs`` [batch, seq, ...]; ``last_only`` computes them for the last position only
        (the same values as the last position of a full run, without the full run's position-wise tail)."""
        values: dict[str, torch.Tensor] = dict(inputs)
        for i, (step, kernel, dead) in enumerate(zip(self.steps, self.kernels, self._free_after, strict=True)):
            if last_only and i == self._tail_start:
                values = self._last_position(values, ctx)
            out = kernel(ctx, *(values[v] for v in step.inputs))
            if len(step.outputs) == 1:
                values[step.outputs[0]] = out
            else:
                values.update(zip(step.outputs, out, strict=True))
            for v in dead:
                del values[v]
        if last_only and self._tail_start == len(self.steps):
            values = self._last_position(values, ctx)
        return {name: values[name] for name in self.graph.outputs}

    def _last_position(self, values: dict[str, torch.Tensor], ctx: ForwardContext) -> dict[str, torch.Tensor]:
        def last(v: torch.Tensor) -> torch.Tensor:  # the last real position (a padded chunk says where)
            return v[:, -1:] if ctx.last_index is None else v.index_select(1, ctx.last_index)

        return {name: v if name in self._weight_values else last(v) for name, v in values.items()}


def _held_weights(
    weights: Mapping[str, torch.Tensor], names: Iterable[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """``weights[name]`` for every name, on ``device``; on CPU as :func:`held_for_cpu` holds them,
    a tensor shared by several names (tied weights) converted once."""
    held: dict[str, torch.Tensor] = {}
    converted: dict[tuple, torch.Tensor] = {}
    for name in names:
        weight = weights[name].to(device)
        if device.type == "cpu":
            key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
            if key not in converted:
                converted[key] = held_for_cpu(weight)
            weight = converted[key]
        held[name] = weight
    return held


def _positionwise(node: Node, ops: Mapping[str, OpSpec]) -> bool:
    """True when ``node`` computes each sequence position independently of the others."""
    if node.op in POSITIONWISE_OPS or not node.inputs:  # no inputs: it reads weights only
        return True
    if node.op in ("all_gather", "narrow", "quantize", "dequantize"):
        axis = node.attrs.get("axis")
        return axis is None or int(axis) == -1 or int(axis) >= 2
    spec = ops.get(node.op)
    return spec is not None and bool(spec.tags & POSITIONWISE_TAGS)
