"""``x + (a + b)`` as one elementwise kernel: a parallel-attention layer's residual.

Falcon's parallel-attention layer (at tensor parallelism 1, without biases) ends in
``y = add(m, a)`` (the MLP and attention outputs) and ``out = add(x, y)`` (the residual). In eager
torch those are two kernels over the hidden state, each a launch and a pass over memory; at
decode each is a few kilobytes, so the launch is what costs. This kernel reads the three inputs
once and writes the result, rounding as the two torch adds do: ``a + b`` rounded to the dtype,
then ``x +`` that, rounded again (see :mod:`.rounding` for bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.rounding import rounded

BLOCK = 1024


@triton.jit
def _residual_add_kernel(x_ptr, a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
    dtype = x.dtype
    a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    inner = rounded(a + b, dtype).to(tl.float32)
    tl.store(out_ptr + offsets, rounded(x.to(tl.float32) + inner, dtype), mask=ok)


def fusable(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when :func:`residual_add` computes ``x + (a + b)``: one shape (no broadcasting), one
    float dtype, contiguous tensors on one device."""
    return (
        x.shape == a.shape == b.shape
        and x.dtype == a.dtype == b.dtype
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.device == a.device == b.device
        and x.is_contiguous()
        and a.is_contiguous()
        and b.is_contiguous()
    )


def residual_add(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + (a + b)`` in one launch, rounded as torch's two adds round (see :func:`fusable`)."""
    if not fusable(x, a, b):
        raise ValueError(f"residual_add needs one shape, float dtype and contiguous layout, got {x.shape} {a.shape}")
    out = torch.empty_like(x)
    n = x.numel()
    _residual_add_kernel[(triton.cdiv(n, BLOCK),)](x, a, b, out, n, BLOCK=BLOCK, num_warps=4)
    return out
