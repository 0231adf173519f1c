"""ONNX lowerings of the core quantization primitives, and the fused weight pattern TensorRT needs.

* ``quantize`` -> QuantizeLinear (saturating for float8), ``dequantize`` -> DequantizeLinear,
  symmetric (TensorRT rejects non-zero zero points, so none is passed). Per-tensor and per-channel
  scales are float32 initializers, so each DequantizeLinear yields float32 and a Cast brings it to
  the compute dtype; blocked scales are stored in the compute dtype, so the DequantizeLinear output
  needs no Cast (strongly typed networks need both MatMul inputs of one type).
* ``matmul`` -> Transpose + MatMul (+ Add) for a weight computed in the graph.
* :data:`DEQUANTIZED_MATMUL`, ``matmul(x, dequantize(stored weight))``: the weight is stored
  transposed, ``[in, out]``, so DequantizeLinear feeds MatMul directly, the Q/DQ pattern
  TensorRT turns into FP8 or INT4 GEMMs (and onnxruntime into MatMulNBits). A blocked weight
  whose last block is ragged is stored as whole blocks (zero codes) and the activation padded to
  match (see :func:`lower_dequantized_matmul` for why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compiler_core.errors import ModelcError
from compiler_core.formats.int4 import unpack_int4
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern
from modelc_plugins.onnx.lowering import OnnxLowering, emit_dequantize, emit_matmul, emit_quantize


def _is_blocked(node: Node) -> bool:
    return node.attrs.get("block_size") is not None


def _scale(ctx: OnnxLowering, node: Node, transpose: bool = False) -> str:
    """The node's scale initializer: a float32 scalar / 1-D per tensor / channel, compute-dtype blocks."""
    name = node.params["scale"]
    scale = ctx.weight(node, "scale")
    if _is_blocked(node):
        if transpose:
            return ctx.initializer(f"{name}.T", scale.t(), ctx.compute_dtype)
        return ctx.initializer(f"{name}.blocks", scale, ctx.compute_dtype)
    if "axis" in node.attrs:
        return ctx.initializer(f"{name}.channels", scale.float().reshape(-1))
    return ctx.initializer(f"{name}.scalar", scale.float().reshape(()))


def _codes(ctx: OnnxLowering, node: Node) -> torch.Tensor:
    """A stored weight's codes, int4 unpacked to one per element (the initializer packs them again)."""
    stored = ctx.weight(node, "quantized")
    return unpack_int4(stored) if node.attrs["dtype"] == "int4" else stored


def _axis_attrs(node: Node, rank: int | None = None, transpose: bool = False) -> dict[str, int]:
    """DequantizeLinear's ``axis`` / ``block_size``; ``rank`` (known for a stored weight) makes the
    axis non-negative, ``transpose`` swaps it for a 2-D weight stored transposed."""
    if "axis" not in node.attrs:
        return {}
    axis = int(node.attrs["axis"]) if rank is None else int(node.attrs["axis"]) % rank
    attrs = {"axis": (1 - axis) if transpose else axis}
    if _is_blocked(node):
        attrs["block_size"] = int(node.attrs["block_size"])
    return attrs


def lower_quantize(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    if _is_blocked(node):
        raise ModelcError(f"node {node.name}: the onnx backend quantizes per tensor or per channel, not in blocks")
    axis = node.attrs.get("axis")
    q = emit_quantize(ctx, x, _scale(ctx, node), out_dtype=node.attrs["dtype"], axis=axis, x_dtype=ctx.dtype_of(x))
    return [q]


def lower_dequantize(node: Node, ctx: OnnxLowering) -> list[str]:
    out_dtype = node.attrs.get("out_dtype")
    if node.inputs:
        (q,) = ctx.inputs(node)
        return [emit_dequantize(ctx, q, _scale(ctx, node), **_axis_attrs(node), out_dtype=out_dtype)]
    codes = _codes(ctx, node)
    attrs = _axis_attrs(node, codes.dim())
    pad = _ragged_pad(node, codes)
    if pad:
        codes = F.pad(codes, (0, pad)) if attrs["axis"] == codes.dim() - 1 else F.pad(codes, (0, 0, 0, pad))
    q = ctx.initializer(f"{node.params['quantized']}.codes", codes, node.attrs["dtype"])
    weight = emit_dequantize(ctx, q, _scale(ctx, node), **attrs, out_dtype=out_dtype)
    if pad:
        size = codes.shape[attrs["axis"]] - pad
        weight = ctx.emit("Slice", [weight, ctx.const([0]), ctx.const([size]), ctx.const([attrs["axis"]])])
    return [weight]


def _ragged_pad(node: Node, codes: torch.Tensor) -> int:
    """Zero codes that make a blocked weight's blocked axis whole blocks (0 when it already is)."""
    if not _is_blocked(node):
        return 0
    size = codes.shape[int(node.attrs["axis"])]
    return -size % int(node.attrs["block_size"])


def lower_matmul(node: Node, ctx: OnnxLowering) -> list[str]:
    x, weight = ctx.inputs(node)
    weight_in_out = ctx.emit("Transpose", [weight], {"perm": [1, 0]})
    return [emit_matmul(ctx, x, weight_in_out, ctx.param(node, "bias"), outputs=ctx.outputs_of(node))]


def lower_channel_scale(node: Node, ctx: OnnxLowering) -> list[str]:
    (x,) = ctx.inputs(node)
    return [ctx.emit("Mul", [x, ctx.param(node, "scale")], outputs=ctx.outputs_of(node))]


def lower_dequantized_matmul(match: Match, ctx: OnnxLowering) -> list[str]:
    """``x @ dequantize(W).T (+ bias)`` with W stored transposed, DequantizeLinear straight into MatMul."""
    node = match.node("weight")
    (x,) = (ctx.value(v) for v in match.inputs)
    codes = _codes(ctx, node)
    pad = _ragged_pad(node, codes)
    if pad:
        # A ragged last block is stored as a whole block: zero codes pad the weight and a Pad gives
        # the activation as many zero columns. The ONNX spec (and onnxruntime) would take a ragged
        # last block (scale dim ceil(D / block_size)), but TensorRT's parser derives the block from
        # D / scale dim: it rejects 4544 inputs in 36 blocks and would read 96 inputs in 2 blocks of
        # 64 as blocks of 48. Padding the activation rather than slicing the dequantized weight
        # keeps the DequantizeLinear -> MatMul pattern that TensorRT's INT4 GEMM and onnxruntime's
        # MatMulNBits fuse.
        codes = F.pad(codes, (0, pad))
        x = ctx.emit("Pad", [x, ctx.const([0, pad]), "", ctx.const([-1])], dtype=ctx.compute_dtype)
    # Transposed to [in, out] (blocked scales to [in / block, out]): blocks then run along MatMul's K.
    q = ctx.initializer(f"{node.params['quantized']}.T", codes.t(), node.attrs["dtype"])
    weight = emit_dequantize(ctx, q, _scale(ctx, node, transpose=True), **_axis_attrs(node, 2, transpose=True))
    return [emit_matmul(ctx, x, weight, ctx.param(match.root, "bias"), outputs=ctx.outputs_of(match.root))]


def _dequantizes_stored_weight(node: Node) -> bool:
    return (
        not node.inputs
        and "quantized" in node.params
        and node.attrs.get("out_dtype") is None
        and (not _is_blocked(node) or int(node.attrs["axis"]) in (1, -1))
    )


QUANT_LOWERINGS = {
    "quantize": lower_quantize,
    "dequantize": lower_dequantize,
    "matmul": lower_matmul,
    "channel_scale": lower_channel_scale,
}

DEQUANTIZED_MATMUL = FusedPattern(
    "dequantized_matmul",
    "onnx",
    Pattern("matmul", (None, Pattern("dequantize", where=_dequantizes_stored_weight, name="weight"))),
    lower_dequantized_matmul,
)
