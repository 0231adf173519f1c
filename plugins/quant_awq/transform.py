"""The INT4-AWQ graph form: the ``awq_linear`` op, the checkpoint's ``quantization`` section, and
the rewrite of a full-precision graph into the quantized one (used by ``transform_graph`` for
every rank and by the quantizer itself, so both always agree).

A quantized linear ``X`` (its weight param ``X.weight``) reads::

    X.weight                   int8   [out, in / 2]                 two int4 codes per byte (see int4.py)
    X.weights_scaling_factor   dtype  [out, ceil(in / group_size)]  per-group scale, amax / 7
    X.prequant_scaling_factor  dtype  [in]                          only for pre_quant_scale_modules
    X.bias                     dtype  [out]                         unchanged, when the linear has one

and computes ``(x * prequant_scaling_factor) @ dequant(weight).T + bias``.

Any even ``in`` is accepted: when ``group_size`` does not divide it, the last group of each row
is ragged and holds the remaining ``in % group_size`` channels (falcon-7b's 4544 at group 128);
for divisible dims the format is unchanged. Two limits remain, both refused up front by
:func:`check_groups`: an odd ``in`` (codes are packed in pairs along it), and a row-parallel
split whose rank boundary falls inside a group (each rank's slice of the scales must cover
exactly its own channels, so every rank must hold whole groups).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from compiler_core.errors import UsageError
from compiler_core.formats.checkpoint_config import CheckpointConfig, QuantConfig
from compiler_core.ir import Graph, Node, OpSpec, Param
from modelc_plugins.quant_awq.int4 import num_groups

SCHEME_NAME = "int4_awq"
QUANT_ALGO = "W4A16_AWQ"
OP = "awq_linear"
DEFAULT_GROUP_SIZE = 128
#: Group sizes suggested when a row-parallel layer's per-rank input dim does not divide into the requested one.
COMMON_GROUP_SIZES = (128, 64, 32, 16)

AWQ_LINEAR = OpSpec(
    OP,
    "INT4 group-wise weight-only linear: (x * prequant_scaling_factor) @ dequant(weight).T (+ bias). "
    "weight int8 [out, in/2] (two int4 per byte, low nibble = even input index), weights_scaling_factor "
    "[out, ceil(in/group_size)] (the last group holds in % group_size channels when that is not 0), "
    "prequant_scaling_factor [in] (optional). attr `parallel` as for linear.",
    params=("weight", "weights_scaling_factor"),
    optional_params=("prequant_scaling_factor", "bias"),
    attrs=("group_size",),
    optional_attrs=("parallel",),
    tags=frozenset({"quantized_linear"}),
)


def is_awq(config: CheckpointConfig) -> bool:
    """True when a checkpoint config's ``quantization`` section is this scheme's."""
    return config.quantization.quant_algo == QUANT_ALGO


def awq_quantization(
    base: QuantConfig, group_size: int, exclude_modules: Iterable[str], pre_quant_scale_modules: Iterable[str]
) -> QuantConfig:
    """``base`` with the ``quantization`` fields this scheme writes (TensorRT-LLM's names, plus the
    list of linears that carry a ``prequant_scaling_factor`` among the scheme's extras)."""
    prequant = sorted(pre_quant_scale_modules)
    extras = {**base.extras, "has_zero_point": False, "pre_quant_scale": bool(prequant)}
    return replace(
        base,
        quant_algo=QUANT_ALGO,
        group_size=int(group_size),
        exclude_modules=tuple(exclude_modules),
        extras={**extras, "pre_quant_scale_modules": prequant},
    )


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def param_base(node: Node) -> str:
    """The prefix of a linear's parameter names: ``X`` for weight ``X.weight``."""
    weight = node.params["weight"]
    return weight.removesuffix(".weight") if weight.endswith(".weight") else node.name


def check_groups(node: Node, in_features: int, group_size: int, tp_size: int) -> None:
    """UsageError (before any work) for a linear whose per-rank input dim int4_awq cannot store.

    ``in_features`` is the rank's input dim. Refused: an odd one (two codes share a byte along
    it), and a row-parallel split that cuts a group (a rank's scales would then cover channels
    of its neighbour). A ragged last group is fine otherwise: a column-parallel or unsplit
    linear keeps every row's full input dim.
    """
    if in_features % 2:
        raise UsageError(
            f"int4_awq: layer {node.name}: input dim {in_features} is odd; int4 codes are packed in pairs "
            f"along the input dim, so odd input dims are not supported (leave the layer unquantized with "
            f"--exclude_modules)"
        )
    if node.attrs.get("parallel") != "row" or tp_size == 1 or in_features % group_size == 0:
        return
    fits = [g for g in COMMON_GROUP_SIZES if in_features % g == 0]
    hint = f"group sizes that fit: {', '.join(map(str, fits))}" if fits else "no common group size fits"
    raise UsageError(
        f"int4_awq: layer {node.name}: input dim {in_features * tp_size} split over tp_size {tp_size} is "
        f"{in_features} per rank, not a multiple of group_size {group_size} (a rank boundary would cut a "
        f"group: every rank needs whole groups; {hint})"
    )


def quantized_node(node: Node, params: Mapping[str, Param], group_size: int, prequant: bool, dtype: str):
    """The ``awq_linear`` replacing linear ``node`` and the params it declares (by name)."""
    weight = params[node.params["weight"]]
    out, inp = weight.shape
    base = param_base(node)
    new_params = {
        weight.name: Param(weight.name, (out, inp // 2), "int8"),
        f"{base}.weights_scaling_factor": Param(
            f"{base}.weights_scaling_factor", (out, num_groups(inp, group_size)), dtype
        ),
    }
    roles = {"weight": weight.name, "weights_scaling_factor": f"{base}.weights_scaling_factor"}
    if prequant:
        new_params[f"{base}.prequant_scaling_factor"] = Param(f"{base}.prequant_scaling_factor", (inp,), dtype)
        roles["prequant_scaling_factor"] = f"{base}.prequant_scaling_factor"
    if "bias" in node.params:
        roles["bias"] = node.params["bias"]
    attrs: dict[str, Any] = {"group_size": int(group_size)}
    if "parallel" in node.attrs:
        attrs["parallel"] = node.attrs["parallel"]
    return node.replace(op=OP, params=roles, attrs=attrs), new_params


def quantizable_linears(graph: Graph, exclude_modules: Iterable[str]) -> list[Node]:
    """The graph's ``linear`` nodes that are not excluded by name pattern."""
    patterns = list(exclude_modules)
    return [n for n in graph.nodes_of("linear") if not is_excluded(n.name, patterns)]


def transform_graph(graph: Graph, config: CheckpointConfig) -> Graph:
    """Rewrite every non-excluded ``linear`` of a rank's graph into ``awq_linear`` per ``config``."""
    if not is_awq(config):
        return graph
    q = config.quantization
    group_size = DEFAULT_GROUP_SIZE if q.group_size is None else q.group_size
    prequant = set(q.extras.get("pre_quant_scale_modules") or ())
    tp_size = int((graph.attrs.get("mapping") or {}).get("tp_size", 1))
    dtype = graph.attrs.get("dtype", config.dtype)
    params = dict(graph.params)
    replaced = {}
    for node in quantizable_linears(graph, q.exclude_modules or ()):
        check_groups(node, params[node.params["weight"]].shape[1], group_size, tp_size)
        new, new_params = quantized_node(node, params, group_size, node.name in prequant, dtype)
        replaced[node.name] = new
        params.update(new_params)
    nodes = tuple(replaced.get(n.name, n) for n in graph.nodes)
    return graph.replace(nodes=nodes, params=params)


def output_heads(graph: Graph) -> list[str]:
    """Linears whose output reaches a graph output through non-GEMM nodes only (the logits head).

    They are left unquantized by default, as TensorRT-LLM and ModelOpt leave ``lm_head``.
    """
    producer = {out: node for node in graph.nodes for out in node.outputs}
    heads, todo, seen = [], list(graph.outputs), set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "linear":
            heads.append(node.name)
        elif node.op in ("all_gather", "narrow"):
            todo.extend(node.inputs)
    return heads
