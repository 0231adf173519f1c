"""``fp8_linear`` for the torch backend.

Two kernels with the same numerics (static per-tensor scales; activations quantized with
``numerics.quantize``, i.e. x / scale saturated to ±448 and rounded to nearest even):

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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from modelc_plugins.quant_fp8 import numerics

from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.ir import Node

#: cuBLASLt FP8 GEMMs need both matrix dimensions of the weight to be multiples of 16.
_SCALED_MM_ALIGN = 16


def scaled_mm_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` has FP8 tensor-core GEMMs (CUDA, sm_89 / sm_90 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def lower_fp8_linear(node: Node, low: TorchLowering) -> Callable[..., torch.Tensor]:
    """The kernel ``fn(ctx, x) -> y`` of one ``fp8_linear`` node."""
    weight = low.param(node, "weight")
    bias = low.param(node, "bias")
    w_scale = low.param(node, "weights_scaling_factor").float().reshape(())
    a_scale = low.param(node, "activation_scaling_factor").float().reshape(())
    out_features, in_features = weight.shape
    compute = low.compute_dtype
    if (
        scaled_mm_supported(weight.device)
        and out_features % _SCALED_MM_ALIGN == 0
        and in_features % _SCALED_MM_ALIGN == 0
    ):
        kernel = _scaled_mm_kernel(weight, bias, w_scale, a_scale, compute)
        try:
            kernel(None, torch.zeros(1, in_features, dtype=compute, device=weight.device))
            return kernel
        except RuntimeError as exc:  # an FP8 GEMM this torch/cuBLAS cannot run: emulate instead
            warnings.warn(
                f"node {node.name}: torch._scaled_mm failed ({exc}); using the emulated FP8 GEMM", stacklevel=2
            )
    return _emulated_kernel(weight, bias, w_scale, a_scale, compute)


def _emulated_kernel(weight, bias, w_scale, a_scale, compute):
    gemm_dtype = torch.float32 if compute == torch.float16 else compute
    wide = weight.to(gemm_dtype)
    scale = a_scale * w_scale
    bias = None if bias is None else bias.float()

    def fp8_linear(ctx, x: torch.Tensor) -> torch.Tensor:
        xq = numerics.quantize(x, a_scale)
        y = F.linear(xq.to(gemm_dtype), wide).float() * scale
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)

    return fp8_linear


def _scaled_mm_kernel(weight, bias, w_scale, a_scale, compute):
    # _scaled_mm wants the second operand column-major: the transpose of the row-major [out, in] weight.
    weight_t = weight.t()

    def fp8_linear(ctx, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = numerics.quantize(x.reshape(-1, x.shape[-1]), a_scale)
        y = torch._scaled_mm(xq, weight_t, scale_a=a_scale, scale_b=w_scale, out_dtype=compute)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    return fp8_linear
