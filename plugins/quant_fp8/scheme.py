"""The ``fp8`` quantization scheme: calibration, per-layer quantization and the graph rewrite.

Checkpoint layout (TensorRT-LLM / ModelOpt FP8 export)::

    config.json  quantization: {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" | null,
                                "exclude_modules": ["lm_head"]}
    <linear>.weight                    float8_e4m3fn [out, in]   q = sat(w / weights_scaling_factor)
    <linear>.weights_scaling_factor    float32 [1]               amax(w) / 448
    <linear>.activation_scaling_factor float32 [1]               static amax(input) / 448
    <attention>.kv_cache_scaling_factor float32 [1]              amax(K, V as cached) / 448

``<linear>`` is the weight's name without ``.weight`` (``layers.0.attention.qkv``), so a fused
QKV linear has one weight and one activation scale; ``<attention>`` is the attention node's
name (``layers.0.attention.core``). The same functions rewrite nodes for :meth:`transform_graph`
(any rank, from the config) and for :meth:`FP8Scheme.quantize_layer` (tp1, with tensors), so the two
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from compiler_core.api import QuantScheme
from compiler_core.errors import ModelcError
from compiler_core.formats.checkpoint_config import CheckpointConfig, QuantConfig
from compiler_core.ir import Graph, Node, OpSpec, Param
from compiler_core.quantize.calibration import collect_stats, model_graph, real_tokens, token_mask
from compiler_core.quantize.ptq import excluded, quantize_layers
from modelc_plugins.quant_fp8 import numerics

QUANT_ALGO = "FP8"
KV_CACHE_QUANT_ALGO = "FP8"
FP8_IR_DTYPE = "float8_e4m3fn"
#: ModelOpt's default: the vocabulary projection stays in full precision.
DEFAULT_EXCLUDE = ("lm_head",)

FP8_LINEAR = OpSpec(
    "fp8_linear",
    "FP8 E4M3 GEMM with static per-tensor scales: sat(x / activation_scaling_factor) @ weight.T "
    "* (activation_scaling_factor * weights_scaling_factor) (+ bias); weight float8_e4m3fn [out, in].",
    params=("weight", "weights_scaling_factor", "activation_scaling_factor"),
    optional_params=("bias",),
    optional_attrs=("parallel",),
    tags=frozenset({"linear"}),
)


def scale_names(node: Node) -> tuple[str, str]:
    """(weights_scaling_factor, activation_scaling_factor) parameter names of a linear node."""
    weight = node.params["weight"]
    base = weight.removesuffix(".weight") if weight.endswith(".weight") else node.name
    return f"{base}.weights_scaling_factor", f"{base}.activation_scaling_factor"


def kv_scale_name(node: Node) -> str:
    return f"{node.name}.kv_cache_scaling_factor"


def fp8_linear_node(node: Node) -> Node:
    """The ``fp8_linear`` node that replaces ``linear`` node ``node`` (same name, value names, bias)."""
    w_scale, a_scale = scale_names(node)
    params = {**node.params, "weights_scaling_factor": w_scale, "activation_scaling_factor": a_scale}
    return node.replace(op=FP8_LINEAR.name, params=params)


def fp8_kv_attention_node(node: Node) -> Node:
    """``attention`` node ``node`` with its KV cache stored as float8_e4m3fn with a scale."""
    return node.replace(
        params={**node.params, "kv_cache_scaling_factor": kv_scale_name(node)},
        attrs={**node.attrs, "kv_cache_dtype": FP8_IR_DTYPE},
    )


def _scale_param(name: str) -> Param:
    return Param(name, (1,), "float32")


def rewrite_graph(graph: Graph, quantization: QuantConfig) -> Graph:
    """Apply ``quantization``'s FP8 parts (weights and/or KV cache) to a full-precision graph."""
    fp8_weights = quantization.quant_algo == QUANT_ALGO
    fp8_kv = quantization.kv_cache_quant_algo == KV_CACHE_QUANT_ALGO
    if not (fp8_weights or fp8_kv):
        return graph
    skip = quantization.exclude_modules or ()
    params = dict(graph.params)
    nodes = []
    for node in graph.nodes:
        if fp8_weights and node.op == "linear" and not excluded(node.name, skip):
            node = fp8_linear_node(node)
            weight = params[node.params["weight"]]
            params[weight.name] = Param(weight.name, weight.shape, FP8_IR_DTYPE)
            for role in ("weights_scaling_factor", "activation_scaling_factor"):
                params[node.params[role]] = _scale_param(node.params[role])
        elif fp8_kv and node.op == "attention":
            node = fp8_kv_attention_node(node)
            params[kv_scale_name(node)] = _scale_param(kv_scale_name(node))
        nodes.append(node)
    return graph.replace(nodes=tuple(nodes), params=params)


def quantize_linear(
    node: Node, weights: Mapping[str, torch.Tensor], stats: Mapping[str, Any]
) -> tuple[list[Node], dict[str, torch.Tensor]]:
    """FP8 weight and scales of one calibrated linear node (stats: ``input_amax``, optional ``weight_amax``)."""
    weight = weights[node.params["weight"]]
    weight_amax = stats.get("weight_amax")
    if weight_amax is None:
        weight_amax = weight.abs().max()
    try:
        w_scale = numerics.scale_from_amax(weight_amax)
        a_scale = numerics.scale_from_amax(stats["input_amax"])
    except ValueError as exc:
        raise ModelcError(f"node {node.name}: calibration gave no usable scale ({exc})") from None
    new = fp8_linear_node(node)
    return [new], {
        new.params["weight"]: numerics.quantize(weight, w_scale.to(weight.device)),
        new.params["weights_scaling_factor"]: w_scale,
        new.params["activation_scaling_factor"]: a_scale,
    }


def quantize_attention(node: Node, stats: Mapping[str, Any]) -> tuple[list[Node], dict[str, torch.Tensor]]:
    """The FP8-KV attention node and its ``kv_cache_scaling_factor`` (stats: ``kv_amax``)."""
    try:
        scale = numerics.scale_from_amax(stats["kv_amax"])
    except ValueError as exc:
        raise ModelcError(f"node {node.name}: calibration gave no usable KV-cache scale ({exc})") from None
    new = fp8_kv_attention_node(node)
    return [new], {kv_scale_name(node): scale}


class _Amax:
    """Running per-node amax, kept on the device so calibration never waits for a sync."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def update(self, name: str, x: torch.Tensor) -> None:
        amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        old = self.values.get(name)
        self.values[name] = amax if old is None else torch.maximum(old, amax)

    def get(self, name: str) -> float:
        return float(self.values[name])


class FP8Scheme(QuantScheme):
    """FP8 E4M3 post-training quantization with static per-tensor scales (weights, activations, KV cache)."""

    name = "fp8"
    quant_algo = QUANT_ALGO
    description = "FP8 E4M3 weights and activations, per-tensor amax/448 scales; optional FP8 KV cache"
    kv_cache_dtypes = ("fp8",)

    def transform_graph(self, graph: Graph, config: CheckpointConfig) -> Graph:
        return rewrite_graph(graph, config.quantization)

    def quantize_layer(self, node: Node, graph: Graph, weights, stats):
        """A linear with ``input_amax`` stats becomes ``fp8_linear``; an attention node with ``kv_amax``
        stats gets an FP8 KV cache."""
        if node.op == "linear" and "input_amax" in stats:
            return quantize_linear(node, weights, stats)
        if node.op == "attention" and "kv_amax" in stats:
            return quantize_attention(node, stats)
        return None

    def quantize(self, model, calibration, options: dict[str, Any]):
        """Record each linear's input amax over the calibration set, then quantize every linear
        outside ``exclude_modules`` (default: lm_head) with :meth:`quantize_layer`."""
        registry = options["registry"]
        skip = list(DEFAULT_EXCLUDE if options.get("exclude_modules") is None else options["exclude_modules"])
        graph = model_graph(registry, model)
        targets = [n for n in graph.nodes if n.op == "linear" and not excluded(n.name, skip)]
        amax = _Amax()

        def record(node: Node, inputs, output, ctx) -> None:
            amax.update(node.name, real_tokens(inputs[0], ctx))

        collect_stats(
            registry,
            graph,
            model.weights,
            calibration,
            {n.name: record for n in targets},
            device=options.get("device", "cpu"),
            show_progress=options.get("show_progress", True),
            desc="calibrate (fp8)",
        )
        stats = {
            n.name: {
                "input_amax": amax.get(n.name),
                "weight_amax": float(model.weights[n.params["weight"]].abs().max()),
            }
            for n in targets
        }
        quantize_layers(registry, model, graph, self, stats, show_progress=options.get("show_progress", True))
        quantization = replace(model.config.quantization, quant_algo=QUANT_ALGO, exclude_modules=tuple(skip))
        model.config = replace(model.config, quantization=quantization)
        return model

    def quantize_kv_cache(self, model, calibration, options: dict[str, Any]):
        """Record the amax of the keys and values each attention layer caches (after rotary
        embedding, through whatever weight quantization already applies); one scale per layer."""
        registry = options["registry"]
        graph = model_graph(registry, model)
        amax = _Amax()

        def record(node: Node, inputs, output, ctx) -> None:
            slot = ctx.cache.slots[node.attrs["cache_slot"]]
            seq = ctx.positions.shape[1]
            real = token_mask(ctx)[:, None, :, None]  # [b, 1, s, 1] against [b, kv_heads, s, head_dim]
            for cached in (slot.k, slot.v):
                amax.update(node.name, cached[:, :, ctx.start : ctx.start + seq].float() * real)

        attention = list(graph.nodes_of("attention"))
        collect_stats(
            registry,
            graph,
            model.weights,
            calibration,
            {n.name: record for n in attention},
            device=options.get("device", "cpu"),
            show_progress=options.get("show_progress", True),
            desc="calibrate (fp8 kv cache)",
        )
        stats = {n.name: {"kv_amax": amax.get(n.name)} for n in attention}
        quantize_layers(registry, model, graph, self, stats, show_progress=options.get("show_progress", True))
        quantization = replace(model.config.quantization, kv_cache_quant_algo=KV_CACHE_QUANT_ALGO)
        model.config = replace(model.config, quantization=quantization)
        return model
