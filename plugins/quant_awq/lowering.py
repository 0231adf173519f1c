"""Kernels for ``awq_linear``.

torch: on CPU the weight is dequantized once, at lowering time, into the compute dtype (a
dense GEMM is the fastest thing a CPU can do with it). On CUDA the weight stays packed in
device memory (a quarter of the fp16 bytes) and each call dequantizes it into a temporary
in the compute dtype before the GEMM, trading some time for the 4x smaller resident weight.
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
