"""Falcon for modelc: every Hugging Face Falcon variant (RW/ALiBi, 7B/MQA, 40B/180B GQA, Falcon2)."""

from __future__ import annotations

from typing import Any

import torch

from compiler_core import hookimpl
from compiler_core.api import Architecture, ScaleGroup
from compiler_core.ir import Graph
from compiler_core.mapping import Mapping
from modelc_plugins.falcon import config as falcon_config
from modelc_plugins.falcon import graph as falcon_graph
from modelc_plugins.falcon.convert import map_falcon_weight, rank_qkv

__version__ = "0.1.0"


class Falcon(Architecture):
    name = falcon_config.ARCHITECTURE

    def detect(self, hf_config: dict[str, Any]) -> bool:
        return falcon_config.is_falcon(hf_config)

    def config_from_hf(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        return falcon_config.config_from_hf(hf_config)

    def check_mapping(self, config: dict[str, Any], mapping: Mapping) -> None:
        falcon_graph.check_mapping(config, mapping)

    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
        return falcon_graph.build_graph(config, mapping, rank, dtype, layers)

    def map_weight(self, config: dict[str, Any], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return map_falcon_weight(config, name, tensor)

    def shard_param(
        self, name: str, tensor: torch.Tensor, graph: Graph, config: dict[str, Any], mapping: Mapping, rank: int
    ) -> torch.Tensor:
        """The fused QKV weight and bias are reordered per rank (:func:`rank_qkv`); everything else,
        per-tensor QKV scales included, takes the core's shape-driven split."""
        fused_rows = (config["num_attention_heads"] + 2 * config["num_kv_heads"]) * config["head_dim"]
        if ".attention.qkv." not in name or tensor.dim() == 0 or tensor.shape[0] != fused_rows:
            return super().shard_param(name, tensor, graph, config, mapping, rank)
        return rank_qkv(
            tensor,
            config["num_attention_heads"],
            config["num_kv_heads"],
            config["head_dim"],
            mapping.tp_size,
            mapping.tp_rank(rank),
        )

    def scale_groups(self, graph: Graph, config: dict[str, Any]) -> list[ScaleGroup]:
        """Falcon's shared inputs: each layer norm feeds the linears after it, the MLP activation
        feeds the down projection. The attention output (qkv -> dense) is left out, as in llm-awq,
        because MQA/GQA would need the scale repeated across KV heads."""
        groups: dict[str, list[str]] = {}
        producers = {out: node for node in graph.nodes for out in node.outputs}
        for node in graph.nodes_of("linear"):
            producer = producers.get(node.inputs[0])
            if producer is None or producer.op not in ("layer_norm", "gelu", "relu", "silu"):
                continue
            groups.setdefault(producer.name, []).append(node.name)
        return [ScaleGroup(p, tuple(linears)) for p, linears in groups.items() if p != "ln_f"]


@hookimpl
def register_architectures(register) -> None:
    register(Falcon())


@hookimpl
def register_commands(cli) -> None:
    from modelc_plugins.falcon.tiny import tiny_falcon_command

    cli.add_command(tiny_falcon_command)
