"""``fp8_linear`` for the torch backend.

Three kernels with the same numerics (static per-tensor scales; activations quantized with
``numerics.quantize``, i.e. x / scale saturated to ±448 and rounded to nearest even):

* **Hopper and newer GPUs, calls of at most** ``TRITON_MAX_ROWS`` **tokens** (decode), where Triton
  is installed: a Triton GEMM that reads the activation in its own dtype and quantizes it in
  registers (``compiler_core/backends/torch/cuda/fp8_gemm.py``), split along K for small M, where
  it measured faster than the next kernel at load time (one row; and, for 2 to 16 rows, at 16).
* **Hopper and newer GPUs, larger calls** (compute capability >= 8.9, both GEMM dimensions multiples of 16):
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

from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.ir import Node

#: cuBLASLt FP8 GEMMs need both matrix dimensions of the weight to be multiples of 16.
_SCALED_MM_ALIGN = 16
#: Tokens per call up to which the fused Triton GEMM may run (where it is also measured faster at
#: load); from 32 rows on cuBLASLt's FP8 GEMM was faster on an H200 even with its separate
#: activation quantization (docs/PERFORMANCE.md).
TRITON_MAX_ROWS = 16


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
    large = None
    if (
        scaled_mm_supported(weight.device)
        and out_features % _SCALED_MM_ALIGN == 0
        and in_features % _SCALED_MM_ALIGN == 0
    ):
        kernel = _scaled_mm_kernel(weight, bias, w_scale, a_scale, compute)
        try:
            kernel(None, torch.zeros(1, in_features, dtype=compute, device=weight.device))
            large = kernel
        except RuntimeError as exc:  # an FP8 GEMM this torch/cuBLAS cannot run: emulate instead
            warnings.warn(
                f"node {node.name}: torch._scaled_mm failed ({exc}); using the emulated FP8 GEMM", stacklevel=2
            )
    if large is None:
        large = _emulated_kernel(weight, bias, w_scale, a_scale, compute)
    if triton_ready(weight.device):
        small = _triton_kernel(node.name, weight, bias, w_scale, a_scale, compute, large)
        if small is not None:
            return small
    return large


def _triton_kernel(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor,
    compute: torch.dtype,
    large: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor] | None:
    """The fused Triton kernel for calls of up to ``TRITON_MAX_ROWS`` tokens and ``large`` beyond,
    or None (with a warning) when the Triton kernel fails or disagrees with ``large`` on a probe."""
    from compiler_core.backends.torch.cuda.fp8_gemm import fp8_linear
    from compiler_core.backends.torch.cuda.timing import first_is_faster

    def triton_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight, w_scale, a_scale, bias)

    # Keyed by "one row?": whether the Triton kernel is taken there (both until measured below).
    use_triton = {True: True, False: True}

    def fp8_linear_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > TRITON_MAX_ROWS or not use_triton[rows == 1]:
            return large(ctx, x)
        return triton_kernel(ctx, x)

    gen = torch.Generator(device=weight.device).manual_seed(0)
    try:
        for rows in (1, TRITON_MAX_ROWS):  # compiles both small-M tilings now, not inside a graph capture
            probe = (torch.randn(rows, weight.shape[1], generator=gen, device=weight.device) * a_scale * 100).to(
                compute
            )
            got, want = fp8_linear_kernel(None, probe).float(), large(None, probe).float()
            # Both round the same FP8 products once to the compute dtype; accumulation order differs.
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
                warnings.warn(
                    f"node {name}: the Triton FP8 GEMM disagrees with the reference; not using it", stacklevel=3
                )
                return None
        # Whether the fused kernel beats the other on this GPU is measured once, at one row and at
        # a few (the vendor GEMM's launch and quantization costs differ between the two).
        for one_row, rows in ((True, 1), (False, TRITON_MAX_ROWS)):
            probe = torch.randn(rows, weight.shape[1], device=weight.device).to(compute)
            use_triton[one_row] = first_is_faster(
                lambda p=probe: triton_kernel(None, p), lambda p=probe: large(None, p), weight.device
            )
    except Exception as exc:  # a Triton compile, launch or capture failure on this GPU: keep the other kernels
        warnings.warn(
            f"node {name}: the Triton FP8 GEMM failed ({type(exc).__name__}: {exc}); not using it", stacklevel=3
        )
        return None
    return fp8_linear_kernel


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
