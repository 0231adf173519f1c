"""modelc-llama: the Llama family as an out-of-tree modelc architecture plugin.

It uses only what modelc's plugin author's guide documents (README, "Writing a plugin"):

* ``register_architectures``: :class:`Llama` (detect, config_from_hf, check_mapping, build_graph);
* ``register_ops`` + ``lower_layer``: ``llama_concat``, which joins the q/k/v projections into the
  fused input the core's ``attention`` op reads;
* ``map_weight``: Hugging Face names -> IR names (and the tied lm_head).

Everything else is the core's: RMSNorm, SwiGLU from ``silu``/``mul``, GQA attention, llama3 rope
scaling as precomputed frequencies (``rope_inv_freq``), tensor/pipeline sharding by shape, the
runtime attributes of each graph, several stop tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from compiler_core import hookimpl
from compiler_core.ir import Graph, Node, OpSpec
from compiler_core.mapping import Mapping
from compiler_core.registry import Architecture
from modelc_llama import config as llama_config
from modelc_llama import graph as llama_graph

__version__ = "0.1.0"

CONCAT = OpSpec(
    llama_graph.CONCAT,
    "Concatenate the inputs along the last axis (modelc-llama: q, k and v for the core attention).",
    num_inputs=(2, 8),
    tags=frozenset({"positionwise"}),
)


class Llama(Architecture):
    """``LlamaForCausalLM`` checkpoints (Llama 2, Llama 3.x and their look-alikes)."""

    name = llama_config.ARCHITECTURE

    def detect(self, hf_config: dict[str, Any]) -> bool:
        return llama_config.is_llama(hf_config)

    def config_from_hf(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        return llama_config.config_from_hf(hf_config)

    def check_mapping(self, config: dict[str, Any], mapping: Mapping) -> None:
        llama_graph.check_mapping(config, mapping)

    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str) -> Graph:
        from compiler_core.plugins import get_plugin_manager

        stages = get_plugin_manager().hook.pipeline_layer_ranges(config=config, pp_size=mapping.pp_size)
        return llama_graph.build_graph(config, mapping, rank, dtype, stages[mapping.pp_rank(rank)])


def _is_llama(config) -> bool:
    return config.get("architecture") == llama_config.ARCHITECTURE


@hookimpl
def register_architectures(register) -> None:
    register(Llama())


@hookimpl
def register_ops(register) -> None:
    register(CONCAT)


@hookimpl
def lower_layer(node: Node, graph: Graph, backend: str, context: Any):
    if node.op != CONCAT.name or backend != "torch":
        return None
    return lambda ctx, *parts: torch.cat(parts, dim=-1)


@hookimpl
def map_weight(config, name: str, tensor: torch.Tensor):
    """``model.X`` -> ``X``; a tied lm_head is the embedding (a stored copy is dropped, as
    transformers ignores it); rotary buffers of old checkpoints are recomputed, so dropped."""
    if not _is_llama(config):
        return None
    if name.endswith("rotary_emb.inv_freq"):
        return {}
    tied = config["tie_word_embeddings"]
    if name == "lm_head.weight":
        return {} if tied else {name: tensor}
    if not name.startswith("model."):
        return None
    ir_name = name.removeprefix("model.")
    if ir_name == "embed_tokens.weight" and tied:
        return {ir_name: tensor, "lm_head.weight": tensor}
    return {ir_name: tensor}
