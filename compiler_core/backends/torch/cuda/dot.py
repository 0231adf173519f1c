"""The tile products the kernels share, with a float32 form for Triton's CPU interpreter.

The interpreter (triton 3.6) multiplies bfloat16 tiles as their raw 16-bit patterns and has no
float8 dot, so there the operands are widened to float32 first: every bfloat16 and E4M3 value is
exact in float32 and the products are accumulated in float32 either way, so both forms compute
the same function (the GPU's accumulation order aside).

The GEMMs' tile product ``x @ w.T`` can run in either operand order (``SWAP``, a launch
parameter of :mod:`.tiling`). With the weight tile as the left operand, the tensor cores' row
dimension is the weight's 64+ output columns instead of the activation's 16 or 32 padded rows:
on an H200 that made the INT4 GEMMs at 1 to 32 rows up to 13% faster and the FP8 ones at one
row up to 10% (docs/PERFORMANCE.md). The accumulator is then kept transposed,
``[BLOCK_N, BLOCK_M]``, and turned once, before the store.
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


@triton.jit
def linear_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """A zero float32 accumulator of an output tile in :func:`linear_dot`'s layout."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def linear_dot(x, w, WIDEN: tl.constexpr, SWAP: tl.constexpr):
    """``x @ w.T`` of an activation tile ``[BLOCK_M, K]`` and a weight tile ``[BLOCK_N, K]`` in float32:
    ``[BLOCK_M, BLOCK_N]``, or with ``SWAP`` its transpose, the weight as the left operand."""
    if SWAP:
        out = tile_dot(w, tl.trans(x), WIDEN)
    else:
        out = tile_dot(x, tl.trans(w), WIDEN)
    return out


@triton.jit
def per_column(v, SWAP: tl.constexpr):
    """A vector over the output columns ``[BLOCK_N]`` broadcastable against :func:`linear_dot`'s layout."""
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def output_tile(acc, SWAP: tl.constexpr):
    """The accumulator as ``[BLOCK_M, BLOCK_N]``, whichever layout it was kept in."""
    if SWAP:
        acc = tl.trans(acc)
    return acc
