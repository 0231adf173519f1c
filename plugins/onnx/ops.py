"""Standard-ONNX lowerings of the core IR ops, with the semantics of ``compiler_core.backends.torch.kernels``.

Each ``lower_*`` takes the IR node and the :class:`~modelc_plugins.onnx.lowering.OnnxLowering` and returns
the ONNX names of the node's outputs. ``all_reduce``/``all_gather`` are not here: the exporter
cuts the graph at them and the session runs them between segments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from onnx import TensorProto

from compiler_core import rope
from compiler_core.backends.torch.kernels import alibi_slopes
from compiler_core.dtypes import torch_dtype
from compiler_core.ir import Node
from modelc_plugins.onnx.lowering import CacheSpec, OnnxLowering, emit_matmul, onnx_type

Lowering = Callable[[Node, OnnxLowering], list[str]]


def lower_embedding(node: Node, ctx: OnnxLowering) -> list[str]:
    (ids,) = ctx.inputs(node)
    return [ctx.emit("Gather", [ctx.param(node, "weight"), ids], {"axis": 0}, outputs=ctx.outputs_of(node))]


def lower_layer_norm(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    inputs = [x, ctx.param(node, "weight")]
    bias = ctx.param(node, "bias")
    if bias is not None:
        inputs.append(bias)
    # stash_type=1 (the default) normalises in float32 whatever the input type, as torch does.
    attrs = {"axis": -1, "epsilon": float(node.attrs["eps"])}
    return [ctx.emit("LayerNormalization", inputs, attrs, outputs=ctx.outputs_of(node))]


def lower_rms_norm(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    # In float32 like the reference: x / sqrt(mean(x^2) + eps), back to the compute dtype, * weight.
    xf = ctx.emit("Cast", [x], {"to": TensorProto.FLOAT})
    mean = ctx.emit("ReduceMean", [ctx.emit("Mul", [xf, xf]), ctx.const([-1])], {"keepdims": 1})
    root = ctx.emit("Sqrt", [ctx.emit("Add", [mean, ctx.const(float(node.attrs["eps"]), "float32")])])
    normed = ctx.emit("Cast", [ctx.emit("Div", [xf, root])], {"to": ctx.compute_type})
    return [ctx.emit("Mul", [ctx.param(node, "weight"), normed], outputs=ctx.outputs_of(node))]


def lower_linear(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    weight = ctx.param(node, "weight", transpose=True)
    return [emit_matmul(ctx, x, weight, ctx.param(node, "bias"), outputs=ctx.outputs_of(node))]


def lower_bias_add(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    return [ctx.emit("Add", [x, ctx.param(node, "bias")], outputs=ctx.outputs_of(node))]


def lower_gelu(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    approximate = node.attrs.get("approximate", "none")
    return [ctx.emit("Gelu", [x], {"approximate": approximate}, outputs=ctx.outputs_of(node))]


def lower_relu(node: Node, ctx: OnnxLowering) -> list[str]:
    return [ctx.emit("Relu", ctx.inputs(node), outputs=ctx.outputs_of(node))]


def lower_silu(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    return [ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])], outputs=ctx.outputs_of(node))]


def lower_add(node: Node, ctx: OnnxLowering) -> list[str]:
    return [ctx.emit("Add", ctx.inputs(node), outputs=ctx.outputs_of(node))]


def lower_mul(node: Node, ctx: OnnxLowering) -> list[str]:
    return [ctx.emit("Mul", ctx.inputs(node), outputs=ctx.outputs_of(node))]


def lower_narrow(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    axis, start, length = (int(node.attrs[k]) for k in ("axis", "start", "length"))
    bounds = [ctx.const([start]), ctx.const([start + length]), ctx.const([axis])]
    return [ctx.emit("Slice", [x, *bounds], outputs=ctx.outputs_of(node))]


# --- attention -----------------------------------------------------------------------------


def rotary_tables(ctx: OnnxLowering, attrs: Mapping[str, Any]) -> tuple[str, str]:
    """cos/sin [batch, seq, 1, dim] in the compute dtype from the position ids, computed in float32,
    with the frequencies and position scaling the core defines (compiler_core.rope)."""
    inv_freq = rope.inv_freq(attrs)
    divisor = rope.position_divisor(attrs)

    def build() -> tuple[str, str]:
        pos = ctx.emit("Cast", [ctx.positions], {"to": TensorProto.FLOAT})
        if divisor is not None:
            pos = ctx.emit("Div", [pos, ctx.const(divisor, "float32")])
        freqs = ctx.emit(
            "Mul", [ctx.emit("Unsqueeze", [pos, ctx.const([-1])]), ctx.initializer(ctx.fresh("inv_freq"), inv_freq)]
        )
        emb = ctx.emit("Unsqueeze", [ctx.emit("Concat", [freqs, freqs], {"axis": -1}), ctx.const([2])])
        cos = ctx.emit("Cast", [ctx.emit("Cos", [emb])], {"to": ctx.compute_type})
        sin = ctx.emit("Cast", [ctx.emit("Sin", [emb])], {"to": ctx.compute_type})
        return cos, sin

    key = ("rope", tuple(inv_freq.tolist()), divisor)
    return ctx.shared(key, build)


def _rotate_half(ctx: OnnxLowering, x: str, dim: int) -> str:
    first, second = ctx.emit("Split", [x, ctx.const([dim // 2, dim // 2])], {"axis": -1}, outputs=2)
    return ctx.emit("Concat", [ctx.emit("Neg", [second]), first], {"axis": -1})


def apply_rotary(ctx: OnnxLowering, x: str, cos: str, sin: str, dim: int, head_dim: int) -> str:
    """GPT-NeoX (rotate-half) rotary embedding on the first ``dim`` channels of each head."""
    rot, rest = (
        (x, None)
        if dim == head_dim
        else ctx.emit("Split", [x, ctx.const([dim, head_dim - dim])], {"axis": -1}, outputs=2)
    )
    out = ctx.emit("Add", [ctx.emit("Mul", [rot, cos]), ctx.emit("Mul", [_rotate_half(ctx, rot, dim), sin])])
    return out if rest is None else ctx.emit("Concat", [out, rest], {"axis": -1})


def allowed_mask(ctx: OnnxLowering) -> str:
    """Bool [batch, 1, 1, seq, total]: key at or before the query, and not padding.

    Token indices come from CumSum over ones shaped like the inputs (not Range), so every dim
    stays a named symbol for ONNX shape inference and TensorRT's shape checks.
    """

    def index(like: str) -> str:  # 0, 1, 2, ... along axis 1 of ``like`` [batch, n]
        ones = ctx.emit("Add", [ctx.emit("Mul", [like, ctx.const(0)]), ctx.const(1)])
        return ctx.emit("Sub", [ctx.emit("CumSum", [ones, ctx.const(1)]), ctx.const(1)])

    def build() -> str:
        query = ctx.emit("Add", [index(ctx.positions), ctx.past_length])  # [batch, seq], absolute
        key = index(ctx.attention_mask)  # [batch, total]
        causal = ctx.emit(
            "LessOrEqual",
            [ctx.emit("Unsqueeze", [key, ctx.const([1])]), ctx.emit("Unsqueeze", [query, ctx.const([2])])],
        )  # [batch, seq, total]
        real = ctx.emit("Not", [ctx.emit("Equal", [ctx.attention_mask, ctx.const(0)])])
        allowed = ctx.emit("And", [causal, ctx.emit("Unsqueeze", [real, ctx.const([1])])])
        return ctx.emit("Unsqueeze", [allowed, ctx.const([1, 2])])

    return ctx.shared("allowed", build)


def alibi_bias(ctx: OnnxLowering, slopes: torch.Tensor, groups: int, scale: float, compute_dtype: str) -> str:
    """ALiBi bias [batch, kv_heads, groups, 1, total] in the compute dtype, times ``scale``.

    As the reference (and HF Falcon/BLOOM): slope x the key's index among real tokens, where
    slopes and indices are first rounded to ``compute_dtype`` (bfloat16 for Falcon) and their
    product is rounded to it too. The products are formed in float32, which is exact for two
    bfloat16/float16 operands, so onnxruntime's CPU provider (no bfloat16 Mul) gets the same bits.
    """

    def build() -> str:
        mask = ctx.attention_mask
        index = ctx.emit("Mul", [ctx.emit("Sub", [ctx.emit("CumSum", [mask, ctx.const(1)]), ctx.const(1)]), mask])
        index = _round_to(ctx, ctx.emit("Cast", [index], {"to": TensorProto.FLOAT}), compute_dtype)
        index = ctx.emit("Unsqueeze", [index, ctx.const([1, 2, 3])])  # [batch, 1, 1, 1, total]
        rounded = slopes.to(torch_dtype(compute_dtype)).float().reshape(-1, groups, 1, 1)  # [kv, g, 1, 1]
        slope = ctx.initializer(ctx.fresh("alibi_slopes"), rounded)
        bias = _round_to(ctx, ctx.emit("Mul", [index, slope]), compute_dtype)
        bias = ctx.emit("Cast", [bias], {"to": ctx.compute_type})
        return ctx.emit("Mul", [bias, ctx.const(scale, ctx.compute_dtype)])

    key = ("alibi", tuple(slopes.tolist()), groups, scale, compute_dtype)
    return ctx.shared(key, build)


def _round_to(ctx: OnnxLowering, x32: str, dtype: str) -> str:
    """Round a float32 value to ``dtype``'s precision, staying float32."""
    if dtype == "float32":
        return x32
    return ctx.emit("Cast", [ctx.emit("Cast", [x32], {"to": onnx_type(dtype)})], {"to": TensorProto.FLOAT})


def lower_attention(node: Node, ctx: OnnxLowering) -> list[str]:
    """Causal attention with a KV cache, as ``kernels.lower_attention``.

    Query heads are grouped per KV head ([batch, kv_heads, group, seq, head_dim]) so that MQA/GQA
    broadcast the cached keys instead of copying them. Reshapes only split or merge the head axis
    (no -1), so ONNX shape inference keeps the symbolic batch/seq dims of the output. Masked
    scores become the dtype's finite minimum through Where (not an additive mask), so fully
    padded query rows stay finite.
    """
    a = node.attrs
    nh, nkv, hd = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    groups = nh // nkv
    dt = ctx.compute_dtype
    (qkv,) = ctx.inputs(node)
    q, k, v = ctx.emit("Split", [qkv, ctx.const([nh * hd, nkv * hd, nkv * hd])], {"axis": -1}, outputs=3)
    q = ctx.emit("Reshape", [q, ctx.const([0, 0, nh, hd])])  # [b, s, heads, hd]
    k = ctx.emit("Reshape", [k, ctx.const([0, 0, nkv, hd])])
    kind = a["position_embedding"]
    if kind == "rope":
        dim = int(a.get("rotary_dim", hd))
        cos, sin = rotary_tables(ctx, a)
        q, k = apply_rotary(ctx, q, cos, sin, dim, hd), apply_rotary(ctx, k, cos, sin, dim, hd)
    elif kind not in ("none", "alibi"):
        raise ValueError(f"node {node.name}: position_embedding {kind!r} has no ONNX lowering")
    k = ctx.emit("Transpose", [k], {"perm": [0, 2, 1, 3]})  # [b, kv, s, hd], the cache layout
    v = _heads(ctx, v, nkv, hd)
    scale_name = node.params.get("kv_cache_scaling_factor")
    kv_scale = None
    if scale_name is not None:
        kv_scale = ctx.initializer(f"{scale_name}.f32", ctx.weights[scale_name].float().reshape(()), "float32")
    spec = CacheSpec(nkv, hd, str(a.get("kv_cache_dtype", dt)))
    k, v = ctx.kv_cache(str(a["cache_slot"]), k, v, spec, kv_scale)

    scale = float(a.get("softmax_scale", 1.0 / math.sqrt(hd)))
    q = ctx.emit("Mul", [q, ctx.const(scale, dt)])
    q = ctx.emit("Reshape", [q, ctx.const([0, 0, nkv, groups, hd])])
    q = ctx.emit("Transpose", [q], {"perm": [0, 2, 3, 1, 4]})  # [b, kv, g, s, hd]
    k = ctx.emit("Transpose", [ctx.emit("Unsqueeze", [k, ctx.const([2])])], {"perm": [0, 1, 2, 4, 3]})  # [b,kv,1,hd,t]
    scores = ctx.emit("MatMul", [q, k])  # [b, kv, g, s, t]
    if kind == "alibi":
        offset = int(a.get("alibi_head_offset", 0))
        slopes = alibi_slopes(int(a.get("alibi_num_heads", nh)))[offset : offset + nh]
        compute = str(a.get("alibi_compute_dtype", "float32"))
        scores = ctx.emit("Add", [scores, alibi_bias(ctx, slopes, groups, float(a.get("alibi_scale", 1.0)), compute)])
    lowest = ctx.const(torch.finfo(torch_dtype(dt)).min, dt)
    scores = ctx.emit("Where", [allowed_mask(ctx), scores, lowest])
    probs = ctx.emit("Softmax", [scores], {"axis": -1})
    out = ctx.emit("MatMul", [probs, ctx.emit("Unsqueeze", [v, ctx.const([2])])])  # [b, kv, g, s, hd]
    out = ctx.emit("Transpose", [out], {"perm": [0, 3, 1, 2, 4]})  # [b, s, kv, g, hd]
    return [ctx.emit("Reshape", [out, ctx.const([0, 0, nh * hd])], outputs=ctx.outputs_of(node))]


def _heads(ctx: OnnxLowering, x: str, heads: int, head_dim: int) -> str:
    """[b, s, heads*head_dim] -> [b, heads, s, head_dim]."""
    x = ctx.emit("Reshape", [x, ctx.const([0, 0, heads, head_dim])])
    return ctx.emit("Transpose", [x], {"perm": [0, 2, 1, 3]})


CORE_LOWERINGS: dict[str, Lowering] = {
    "embedding": lower_embedding,
    "layer_norm": lower_layer_norm,
    "rms_norm": lower_rms_norm,
    "linear": lower_linear,
    "bias_add": lower_bias_add,
    "attention": lower_attention,
    "gelu": lower_gelu,
    "relu": lower_relu,
    "silu": lower_silu,
    "add": lower_add,
    "mul": lower_mul,
    "narrow": lower_narrow,
}

#: Ops the exporter turns into segment boundaries; the session runs them with its Communicator.
COLLECTIVES = ("all_reduce", "all_gather")
