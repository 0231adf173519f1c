"""Static per-tensor FP8 (E4M3) quantization of an activation in one kernel.

The torch expression of the ``quantize`` primitive, ``(x.float() / scale).clamp(-448, 448)`` then
a cast, is four elementwise kernels (widen, divide, clamp, narrow); before each cuBLASLt FP8 GEMM
of a decode step that is four launches for a few kilobytes. This kernel reads ``x`` once and
writes the codes, with the same numerics: an IEEE float32 division, saturation, and rounding to
nearest even with the sign of zero kept (through
:func:`~compiler_core.backends.torch.cuda.fp8_gemm.round_to_e4m3`, which the interpreter also
rounds correctly with).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.fp8_gemm import E4M3_MAX, round_to_e4m3

BLOCK = 1024


@triton.jit
def _quantize_e4m3_kernel(x_ptr, scale_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    scaled = tl.clamp(tl.math.div_rn(x, tl.load(scale_ptr)), -E4M3_MAX, E4M3_MAX)
    tl.store(q_ptr + offsets, round_to_e4m3(scaled).to(tl.float8e4nv), mask=ok)


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of ``x / scale`` (``scale`` a float32 tensor of one element), shaped like ``x``."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    if n:
        _quantize_e4m3_kernel[(triton.cdiv(n, BLOCK),)](x, scale, q, n, BLOCK=BLOCK, num_warps=4)
    return q
