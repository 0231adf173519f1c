"""Kernels for ``awq_linear``.

torch: on CPU the weight is dequantized once, at lowering time, into the compute dtype (a
dense GEMM is the fastest thing a CPU can do with it). On CUDA the weight stays packed in
device memory (a quarter of the fp16 bytes) and each call dequantizes it into a temporary
in the compute dtype before the GEMM, trading some time for the 4x smaller resident weight.

onnx (also what TensorRT parses): the weight-only INT4 pattern TensorRT recognises,
``int4 W[in, out] -> DequantizeLinear(axis=0, block_size=group_size, scale [in/group, out]) ->
MatMul``, preceded by ``Mul(x, prequant_scaling_factor)`` when the layer has one. The scale is
in the compute dtype, so the DequantizeLinear output feeds the MatMul without a Cast (strongly
typed networks need both MatMul inputs of one type). No zero point: TensorRT is symmetric-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compiler_core.ir import Node
from compiler_core.runtime.kernels import Kernel, TorchLowering
from plugins.quant_awq.int4 import dequantize_packed, unpack_int4


def lower_awq_linear_torch(node: Node, low: TorchLowering) -> Kernel:
    """The torch kernel of one ``awq_linear`` node."""
    packed = low.param(node, "weight")
    scales = low.param(node, "weights_scaling_factor")
    prequant = low.param(node, "prequant_scaling_factor")
    bias = low.param(node, "bias")
    dtype = low.compute_dtype
    scales = scales.to(dtype)

    if low.device.type == "cpu":
        weight = dequantize_packed(packed, scales, dtype)

        def dense(ctx, x: torch.Tensor) -> torch.Tensor:
            if prequant is not None:
                x = x * prequant
            return F.linear(x, weight, bias)

        return dense

    out, groups = scales.shape

    def on_the_fly(ctx, x: torch.Tensor) -> torch.Tensor:
        if prequant is not None:
            x = x * prequant
        # The product of a code in [-8, 7] and a scale rounds once in either dtype, so computing
        # it in the compute dtype gives the same weight as the float32 reference.
        w = (unpack_int4(packed).to(dtype).view(out, groups, -1) * scales[..., None]).view(out, -1)
        return F.linear(x, w, bias)

    return on_the_fly


def lower_awq_linear_onnx(node: Node, ctx) -> list[str]:
    """The ONNX nodes of one ``awq_linear`` (``ctx`` is a :class:`plugins.onnx.lowering.OnnxLowering`)."""
    from plugins.onnx.lowering import emit_dequantize, emit_matmul

    (x,) = ctx.inputs(node)
    codes = unpack_int4(ctx.weight(node, "weight"))
    scales = ctx.weight(node, "weights_scaling_factor")
    # Transposed to [in, out] / [in / group, out]: blocks then run along the MatMul's K axis.
    q = ctx.initializer(f"{node.params['weight']}.T", codes.t(), "int4")
    s = ctx.initializer(f"{node.params['weights_scaling_factor']}.T", scales.t(), ctx.compute_dtype)
    weight = emit_dequantize(ctx, q, s, axis=0, block_size=int(node.attrs["group_size"]))
    prequant = ctx.param(node, "prequant_scaling_factor")
    if prequant is not None:
        x = ctx.emit("Mul", [x, prequant])
    return [emit_matmul(ctx, x, weight, ctx.param(node, "bias"), outputs=ctx.outputs_of(node))]
