"""Rounding float32 values to a narrower float type exactly as torch's casts do, in Triton.

Fused elementwise kernels reproduce torch's eager numerics by rounding each intermediate where
torch's kernels round it. A plain ``.to(tl.bfloat16)`` does that on a GPU, but Triton's CPU
interpreter (where the tests run without one) truncates float32 to bfloat16; rounding on the bit
pattern first makes the conversion exact on both.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(v):
    """float32 ``v`` rounded to the nearest bfloat16 value, ties to even, still float32 (NaN stays NaN).

    bfloat16 is float32's top 16 bits, so rounding is on the bit pattern, subnormals and the carry
    into the exponent included.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000: sign, exponent, 7 bits
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def rounded(v, DTYPE: tl.constexpr):
    """float32 ``v`` rounded to ``DTYPE`` (round to nearest even, as torch casts), as a ``DTYPE`` tensor."""
    if DTYPE == tl.bfloat16:
        out = round_to_bf16(v).to(tl.bfloat16)
    else:
        out = v.to(DTYPE)  # float16: the interpreter's numpy cast rounds to nearest even too
    return out


@triton.jit
def cast(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 ``v`` as ``DTYPE``, rounded to nearest even: a plain cast on a GPU, which rounds so,
    and :func:`rounded` under the interpreter (``INTERPRETED``), where the plain cast does not."""
    if INTERPRETED:
        out = rounded(v, DTYPE)
    else:
        out = v.to(DTYPE)
    return out
