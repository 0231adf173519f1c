"""Runs a graph node by node with kernels obtained from the ``lower_layer`` hook."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from compiler_core.backends.torch.cpu_linear import held_for_cpu
from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.dtypes import torch_dtype
from compiler_core.errors import ModelcError
from compiler_core.ir import Graph, Node, OpSpec
from compiler_core.registry import Registry
from compiler_core.runtime.context import ForwardContext, KVCache

#: Core ops that treat every position on its own (no mixing along the sequence axis).
POSITIONWISE_OPS = frozenset(
    {"embedding", "layer_norm", "rms_norm", "linear", "bias_add", "gelu", "relu", "silu", "add", "mul", "all_reduce"}
)
#: OpSpec tags that mark a plugin's op as position-wise (quantized linears, ...).
POSITIONWISE_TAGS = frozenset({"linear", "quantized_linear", "positionwise"})


class GraphExecutor:
    """The torch reference executor for one rank's graph.

    Kernels come from ``registry.lower_layer`` with ``backend="torch"``, so a plugin's op (a
    quantized linear, say) runs here exactly like a core op. Intermediate values are dropped
    after their last use. ``weights`` are the rank's weights as held in memory: on CPU, a float32
    weight whose values are all bfloat16 numbers may be held as bfloat16 (see ``held_for_cpu``).
    """

    def __init__(
        self,
        registry: Registry,
        graph: Graph,
        weights: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
    ):
        self.graph = graph
        self.device = torch.device(device)
        self.dtype = torch_dtype(graph.attrs.get("dtype", "float32"))
        missing = [p for p in graph.params if p not in weights]
        if missing:
            raise ModelcError(f"graph {graph.name}: no weight for parameter {missing[0]!r}")
        self.weights = _held_weights(weights, graph.params, self.device)
        lowering = TorchLowering(self.weights, self.device, graph)
        self.kernels = []
        for node in graph.nodes:
            kernel = registry.lower_layer(node=node, graph=graph, backend="torch", context=lowering)
            if kernel is None:
                raise ModelcError(f"node {node.name}: no plugin lowers op {node.op!r} for the torch backend")
            self.kernels.append(kernel)
        last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for value in node.inputs:
                last_use[value] = i
        keep = set(graph.outputs)
        self._free_after = [
            [v for v in node.inputs if last_use[v] == i and v not in keep] for i, node in enumerate(graph.nodes)
        ]
        # Everything after node `_tail_start - 1` is position-wise (ln_f, lm_head, the last MLP...):
        # when only the last position's output is wanted, the live values are cut to it there.
        self._tail_start = 0
        for i, node in enumerate(graph.nodes):
            if not _positionwise(node, registry.ops):
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
        for i, (node, kernel, dead) in enumerate(zip(self.graph.nodes, self.kernels, self._free_after, strict=True)):
            if last_only and i == self._tail_start:
                values = {name: value[:, -1:] for name, value in values.items()}
            out = kernel(ctx, *(values[v] for v in node.inputs))
            if len(node.outputs) == 1:
                values[node.outputs[0]] = out
            else:
                values.update(zip(node.outputs, out, strict=True))
            for v in dead:
                del values[v]
        if last_only and self._tail_start == len(self.graph.nodes):
            values = {name: value[:, -1:] for name, value in values.items()}
        return {name: values[name] for name in self.graph.outputs}


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
    if node.op in POSITIONWISE_OPS:
        return True
    if node.op in ("all_gather", "narrow"):
        axis = int(node.attrs["axis"])
        return axis == -1 or axis >= 2
    spec = ops.get(node.op)
    return spec is not None and bool(spec.tags & POSITIONWISE_TAGS)
