"""FP8 GEMM: ``matmul(dequantize(quantize(x)), dequantize(weight))`` with FP8 E4M3 per-tensor scales.

This is what an FP8 linear with static scales decomposes into. Two kernels with the same
numerics (activations quantized as the ``quantize`` primitive does: x / scale saturated to ±448
and rounded to nearest even):

* **Hopper and newer GPUs** (compute capability >= 8.9, both GEMM dimensions multiples of 16):
  ``torch._scaled_mm`` multiplies the FP8 operands with FP32 accumulation and applies
  ``activation_scale * weight_scale`` before rounding to the compute dtype.
* **Everywhere else** (CPU included): the FP8 codes are widened (exactly: every E4M3 value is
  representable in fp16, bf16 and fp32) to the compute dtype, or to float32 for float16 models
  (a dot product of codes reaches 448² · in_features, beyond float16's 65504), multiplied
  there, and the product is scaled in float32: the FP8 GEMM up to the accumulation dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from compiler_core.backends.torch.fused.dense import is_stored_weight
from compiler_core.backends.torch.kernels import Kernel, TorchLowering
from compiler_core.backends.torch.quant import quantize_codes
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern

#: cuBLASLt FP8 GEMMs need both matrix dimensions of the weight to be multiples of 16.
_SCALED_MM_ALIGN = 16
_FP8_PER_TENSOR = {"dtype": "float8_e4m3fn"}


def scaled_mm_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` has FP8 tensor-core GEMMs (CUDA, sm_89 / sm_90 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_per_tensor(node: Node) -> bool:
    return dict(node.attrs) == _FP8_PER_TENSOR


def _same_activation_scale(match: Match) -> bool:
    return match.node("quantize").params["scale"] == match.node("activation").params["scale"]


def fp8_gemm(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of one FP8 GEMM (see the module docstring)."""
    weight_node = match.node("weight")
    weight = low.param(weight_node, "quantized")
    bias = low.param(match.root, "bias")
    w_scale = low.param(weight_node, "scale").float().reshape(())
    a_scale = low.param(match.node("quantize"), "scale").float().reshape(())
    out_features, in_features = weight.shape
    compute = low.compute_dtype
    if (
        scaled_mm_supported(weight.device)
        and out_features % _SCALED_MM_ALIGN == 0
        and in_features % _SCALED_MM_ALIGN == 0
    ):
        kernel = scaled_mm_kernel(weight, bias, w_scale, a_scale, compute)
        try:
            kernel(None, torch.zeros(1, in_features, dtype=compute, device=weight.device))
            return kernel
        except RuntimeError as exc:  # an FP8 GEMM this torch/cuBLAS cannot run: emulate instead
            warnings.warn(
                f"node {match.root.name}: torch._scaled_mm failed ({exc}); using the emulated FP8 GEMM", stacklevel=2
            )
    return emulated_kernel(weight, bias, w_scale, a_scale, compute)


def _quantize(x: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    return quantize_codes(x, a_scale, _FP8_PER_TENSOR)


def emulated_kernel(weight, bias, w_scale, a_scale, compute) -> Kernel:
    """The FP8 GEMM on widened codes (any device)."""
    gemm_dtype = torch.float32 if compute == torch.float16 else compute
    wide = weight.to(gemm_dtype)
    scale = a_scale * w_scale
    bias = None if bias is None else bias.float()

    def fp8_gemm(ctx, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(_quantize(x, a_scale).to(gemm_dtype), wide).float() * scale
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)

    return fp8_gemm


def scaled_mm_kernel(weight, bias, w_scale, a_scale, compute) -> Kernel:
    """The FP8 GEMM through ``torch._scaled_mm``."""
    # _scaled_mm wants the second operand column-major: the transpose of the row-major [out, in] weight.
    weight_t = weight.t()

    def fp8_gemm(ctx, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = _quantize(x.reshape(-1, x.shape[-1]), a_scale)
        y = torch._scaled_mm(xq, weight_t, scale_a=a_scale, scale_b=w_scale, out_dtype=compute)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    return fp8_gemm


FP8_GEMM = FusedPattern(
    "fp8_gemm",
    "torch",
    Pattern(
        "matmul",
        (
            Pattern(
                "dequantize",
                (Pattern("quantize", where=_fp8_per_tensor, name="quantize"),),
                _fp8_per_tensor,
                "activation",
            ),
            Pattern("dequantize", where=lambda n: is_stored_weight(n) and _fp8_per_tensor(n), name="weight"),
        ),
    ),
    fp8_gemm,
    check=_same_activation_scale,
)
