"""The tile product the kernels share, with a float32 form for Triton's CPU interpreter.

The interpreter (triton 3.6) multiplies bfloat16 tiles as their raw 16-bit patterns and has no
float8 dot, so there the operands are widened to float32 first: every bfloat16 and E4M3 value is
exact in float32 and the products are accumulated in float32 either way, so both forms compute
the same function (the GPU's accumulation order aside).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, WIDEN: tl.constexpr):
    """``a @ b`` accumulated in float32 (``WIDEN``: operands widened to float32 first).

    float32 operands are multiplied in full float32 ("ieee"), not Triton's default tf32, so that
    float32 engines keep float32 numerics.
    """
    if WIDEN:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
