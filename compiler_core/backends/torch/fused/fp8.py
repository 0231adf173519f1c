"""FP8 GEMM: ``matmul(dequantize(quantize(x)), dequantize(weight))`` with FP8 E4M3 per-tensor scales.

This is what an FP8 linear with static scales decomposes into. Three kernels with the same
numerics (activations quantized as the ``quantize`` primitive does: x / scale saturated to ±448
and rounded to nearest even):

* **Hopper and newer GPUs, calls of at most** ``TRITON_MAX_ROWS`` **tokens** (decode), where Triton
  is installed: a Triton GEMM that reads the activation in its own dtype and quantizes it in
  registers (``compiler_core/backends/torch/cuda/fp8_gemm.py``), split along K for small M, where
  it measured faster than the next kernel at load time (one row; and, for 2 to 16 rows, at 16).
  Each layer checks it once against that kernel on probe inputs and keeps the other (with a
  warning) if it fails or disagrees.
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

from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.backends.torch.cuda.epilogue import NONE, Epilogue
from compiler_core.backends.torch.cuda.tiling import probe_rows
from compiler_core.backends.torch.fused.dense import is_stored_weight
from compiler_core.backends.torch.fused.epilogue import GEMM, epilogue_of, with_epilogue, with_epilogues
from compiler_core.backends.torch.kernels import Kernel, TorchLowering
from compiler_core.backends.torch.quant import quantize_codes
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern

#: cuBLASLt FP8 GEMMs need both matrix dimensions of the weight to be multiples of 16.
_SCALED_MM_ALIGN = 16
_FP8_PER_TENSOR = {"dtype": "float8_e4m3fn"}
#: Tokens per call up to which the fused Triton GEMM may run (where it is also measured faster at
#: load); from 32 rows on cuBLASLt's FP8 GEMM was faster on an H200 even with its separate
#: activation quantization (docs/PERFORMANCE.md).
TRITON_MAX_ROWS = 16


def scaled_mm_supported(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` has FP8 tensor-core GEMMs (CUDA, sm_89 / sm_90 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_per_tensor(node: Node) -> bool:
    return dict(node.attrs) == _FP8_PER_TENSOR


def _same_activation_scale(match: Match) -> bool:
    return match.node("quantize").params["scale"] == match.node("activation").params["scale"]


def fp8_gemm(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of one FP8 GEMM (see the module docstring)."""
    gemm, weight_node = match.node(GEMM), match.node("weight")
    weight = low.param(weight_node, "quantized")
    bias = low.param(gemm, "bias")
    w_scale = low.param(weight_node, "scale").float().reshape(())
    a_scale = low.param(match.node("quantize"), "scale").float().reshape(())
    compute = low.compute_dtype
    epilogue = epilogue_of(match, low)
    large = with_epilogue(vendor_kernel(gemm.name, weight, bias, w_scale, a_scale, compute), epilogue)
    if triton_ready(weight.device):
        small = triton_kernel(gemm.name, weight, bias, w_scale, a_scale, compute, large, epilogue)
        if small is not None:
            return small
    return large


def vendor_kernel(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor,
    compute: torch.dtype,
) -> Kernel:
    """``torch._scaled_mm`` where it applies and runs, else the emulated FP8 GEMM."""
    out_features, in_features = weight.shape
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
            warnings.warn(f"node {name}: torch._scaled_mm failed ({exc}); using the emulated FP8 GEMM", stacklevel=3)
    return emulated_kernel(weight, bias, w_scale, a_scale, compute)


def triton_kernel(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor,
    compute: torch.dtype,
    large: Kernel,
    epilogue: Epilogue = NONE,
) -> Kernel | None:
    """The fused Triton kernel (``epilogue`` after the GEMM) for calls of up to ``TRITON_MAX_ROWS``
    tokens and ``large`` (which applies it too) beyond, or None (with a warning) when the Triton
    kernel fails or disagrees with ``large`` on a probe."""
    from compiler_core.backends.torch.cuda.fp8_gemm import fp8_linear
    from compiler_core.backends.torch.cuda.splitk import TileLocks
    from compiler_core.backends.torch.cuda.timing import first_is_faster

    locks = TileLocks(weight.device)

    def fused(ctx, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, weight, w_scale, a_scale, bias, locks=locks, epilogue=epilogue)

    # Keyed by "one row?": whether the Triton kernel is taken there (both until measured below).
    use_triton = {True: True, False: True}

    def fp8_linear_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > TRITON_MAX_ROWS or not use_triton[rows == 1]:
            return large(ctx, x)
        return fused(ctx, x)

    gen = torch.Generator(device=weight.device).manual_seed(0)
    try:
        # Compiles every small-M launch of the table now, not inside a graph capture.
        for rows in probe_rows("fp8", *weight.shape, max_rows=TRITON_MAX_ROWS):
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
                lambda p=probe: fused(None, p), lambda p=probe: large(None, p), weight.device
            )
    except Exception as exc:  # a Triton compile, launch or capture failure on this GPU: keep the other kernels
        warnings.warn(
            f"node {name}: the Triton FP8 GEMM failed ({type(exc).__name__}: {exc}); not using it", stacklevel=3
        )
        return None
    return fp8_linear_kernel


def _quantize(x: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    return quantize_codes(x, a_scale, _FP8_PER_TENSOR)


def activation_quantizer(a_scale: torch.Tensor, compute: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> FP8 codes of x / a_scale``: the one-kernel Triton quantization where it is ready and gives
    the same codes as the torch expression on a probe (every E4M3 boundary and tie, saturation), else
    the torch expression (four elementwise kernels)."""
    if not triton_ready(a_scale.device):
        return lambda x: _quantize(x, a_scale)
    from compiler_core.backends.torch.cuda.fp8_quant import quantize_e4m3

    codes = torch.arange(256, dtype=torch.uint8, device=a_scale.device).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].sort().values
    # Every code, the midpoints between neighbours (ties), values past saturation, times the scale.
    midpoints = (codes[1:] + codes[:-1]) / 2
    probe = (torch.cat([codes, midpoints, torch.tensor([500.0, -1e4], device=a_scale.device)]) * a_scale).to(compute)
    try:
        same = torch.equal(quantize_e4m3(probe, a_scale).view(torch.uint8), _quantize(probe, a_scale).view(torch.uint8))
    except Exception as exc:  # a Triton compile or launch failure on this GPU: keep the torch expression
        warnings.warn(f"the Triton FP8 quantization failed ({type(exc).__name__}: {exc}); not using it", stacklevel=3)
        same = None
    if same is False:
        warnings.warn("the Triton FP8 quantization disagrees with the torch expression; not using it", stacklevel=3)
    if not same:
        return lambda x: _quantize(x, a_scale)
    return lambda x: quantize_e4m3(x, a_scale)


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
    """The FP8 GEMM through ``torch._scaled_mm``, its activation quantized by :func:`activation_quantizer`."""
    # _scaled_mm wants the second operand column-major: the transpose of the row-major [out, in] weight.
    weight_t = weight.t()
    quantize = activation_quantizer(a_scale, compute)

    def fp8_gemm(ctx, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = quantize(x.reshape(-1, x.shape[-1]))
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
        name=GEMM,
    ),
    fp8_gemm,
    check=_same_activation_scale,
)
#: The FP8 GEMM and its forms with a GELU and / or a channel scale after it.
FP8_GEMMS = with_epilogues(FP8_GEMM)
