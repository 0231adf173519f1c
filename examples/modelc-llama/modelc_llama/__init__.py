"""modelc-llama: the Llama family as an out-of-tree modelc architecture plugin.

It uses only what modelc's plugin author's guide documents (README, "Writing a plugin"):

* ``register_architectures``: :class:`Llama` (detect, config_from_hf, check_mapping, build_graph,
  and map_weight: Hugging Face names -> IR names, and the tied lm_head);
* ``register_ops`` + ``register_lowerings``: ``llama_concat``, which joins the q/k/v projections into the
  fused input the core's ``attention`` op reads.

Everything else is the core's: RMSNorm, SwiGLU from ``silu``/``mul``, GQA attention, llama3 rope
scaling as precomputed frequencies (``rope_inv_freq``), pipeline stages, tensor sharding by shape,
the runtime attributes of each graph, AWQ scale groups, several stop tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from compiler_core import hookimpl
from compiler_core.api import Architecture
from compiler_core.ir import Graph, Node, OpSpec
from compiler_core.lowering import Lowering
from compiler_core.mapping import Mapping
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

    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
        return llama_graph.build_graph(config, mapping, rank, dtype, layers)

    def map_weight(self, config: dict[str, Any], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``model.X`` -> ``X``; a tied lm_head is the embedding (a stored copy is dropped, as
        transformers ignores it); rotary buffers of old checkpoints are recomputed, so dropped."""
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


@hookimpl
def register_architectures(register) -> None:
    register(Llama())


@hookimpl
def register_ops(register) -> None:
    register(CONCAT)


def lower_concat(node: Node, context: Any):
    """The torch kernel of ``llama_concat``: one ``torch.cat`` over the last axis."""
    return lambda ctx, *parts: torch.cat(parts, dim=-1)


@hookimpl
def register_lowerings(register) -> None:
    register(Lowering(CONCAT.name, "torch", lower_concat))
