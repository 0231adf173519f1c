"""The ``int4_awq`` quantization scheme (``modelc quantize --qformat int4_awq``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from compiler_core.api import QuantScheme
from compiler_core.convert.from_hf import LoadedModel
from compiler_core.errors import ModelcError, UsageError
from compiler_core.ir import Graph, Node
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.progress import progress
from compiler_core.quantize.calibration import CalibrationSet, model_graph
from compiler_core.quantize.ptq import quantize_layers
from compiler_core.quantize.scale_groups import describe_scale_groups, scale_groups_for
from compiler_core.registry import Registry
from modelc_plugins.quant_awq import transform
from modelc_plugins.quant_awq.calibrate import (
    DEFAULT_MAX_TOKENS,
    feeds_attention,
    observe_inputs,
    plan_scales,
    quantize_linear,
    search_scales,
)
from modelc_plugins.quant_awq.transform import (
    DEFAULT_GROUP_SIZE,
    QUANT_ALGO,
    SCHEME_NAME,
    awq_quantization,
    check_groups,
    output_heads,
    quantizable_linears,
)


class Int4AwqScheme(QuantScheme):
    """INT4 weight-only, group-wise, symmetric, with AWQ activation-aware scales and clipping.

    ``options`` read by :meth:`quantize` (besides the generic ones): ``group_size`` (default 128),
    ``awq_max_tokens`` (calibration tokens each search is scored on, default 2048) and
    ``mapping`` (the target split, checked for whole groups per row-parallel rank before calibrating).
    """

    name = SCHEME_NAME
    quant_algo = QUANT_ALGO
    description = "INT4 weights (group-wise, symmetric) with AWQ scales and clipping; activations in model dtype"

    def transform_graph(self, graph, config):
        return transform.transform_graph(graph, config)

    def quantize_layer(self, node: Node, graph: Graph, weights: dict[str, torch.Tensor], stats: dict[str, Any]):
        """A linear becomes ``awq_linear`` (stats: group size, AWQ scales, samples for clipping)."""
        return quantize_linear(node, graph, weights, stats) if node.op == "linear" else None

    def quantize(self, model: LoadedModel, calibration: CalibrationSet, options: dict[str, Any]) -> LoadedModel:
        group_size = int(options.get("group_size") or DEFAULT_GROUP_SIZE)
        if group_size <= 0 or group_size % 2:
            raise UsageError(f"--group_size must be a positive even number, got {group_size}")
        max_tokens = int(options.get("awq_max_tokens") or DEFAULT_MAX_TOKENS)
        device = options.get("device") or "cpu"
        show = bool(options.get("show_progress", True))
        registry: Registry = options["registry"]
        arch = registry.architecture(model.config.architecture, "config.json")

        graph = model_graph(registry, model)
        exclude = options.get("exclude_modules")
        exclude = output_heads(graph) if exclude is None else list(exclude)
        linears = quantizable_linears(graph, exclude)
        if not linears:
            raise UsageError(f"exclude_modules {exclude}: no linear layer is left to quantize")
        self._check_split(registry, model, linears, group_size, exclude, options.get("mapping"))
        quantized = {n.name for n in linears}

        groups, source = scale_groups_for(arch, graph, model.config.model, registry.ops)
        plans = plan_scales(graph, groups, quantized)
        stats = observe_inputs(
            registry,
            graph,
            model.weights,
            calibration,
            linears,
            max_tokens=max_tokens,
            device=device,
            show_progress=show,
        )
        scales = search_scales(
            plans,
            model.weights,
            stats,
            quantized,
            group_size,
            device=device,
            progress_bar=lambda items: progress(items, desc="awq scales", unit="group", enable=show),
        )
        prequant = {n.name for p in plans if not p.fold for n in p.linears}
        layer_stats = {
            n.name: {
                "group_size": group_size,
                "scales": scales.get(n.name),
                "prequant": n.name in prequant,
                "x": stats[n.inputs[0]].sample(),
                "device": device,
                "clip": not feeds_attention(graph, n),
            }
            for n in linears
        }
        quantization = awq_quantization(model.config.quantization, group_size, exclude, prequant)
        extras = {**quantization.extras, "scale_groups": describe_scale_groups(groups, source)}
        model.config = replace(model.config, quantization=replace(quantization, extras=extras))
        quantized_graph = quantize_layers(registry, model, graph, self, layer_stats, show_progress=show)
        expected = transform.transform_graph(graph, model.config)
        if quantized_graph.nodes != expected.nodes:
            raise ModelcError("int4_awq: the quantize_layer results disagree with transform_graph")
        return model

    @staticmethod
    def _check_split(
        registry: Registry, model: LoadedModel, linears, group_size: int, exclude: list[str], mapping: Mapping | None
    ) -> None:
        """Fail before calibrating when a linear has an odd input dim or a rank would not hold whole groups."""
        for node in linears:
            in_features = model.weights[node.params["weight"]].shape[1]
            check_groups(node, in_features, group_size, 1)
        if mapping is None or mapping.tp_size == 1:
            return
        preview = replace(
            model.config,
            mapping=mapping,
            quantization=awq_quantization(model.config.quantization, group_size, exclude, ()),
        )
        for rank in mapping.ranks():
            rank_graph(registry, preview, rank)
