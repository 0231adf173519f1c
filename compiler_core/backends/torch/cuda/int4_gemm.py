"""INT4 weight-only GEMM for every M: the packed weight and its group scales are read directly.

The weight layout is the checkpoint's (``plugins/quant_awq/int4.py``): int8 ``[out, in / 2]``,
byte ``j`` of a row holding code ``2j`` in its low nibble and ``2j + 1`` in its high nibble, one
scale per group of ``group_size`` input channels. :func:`prepare_int4_weight` pads each row once,
at lowering time, to whole groups with zero codes (falcon-7b's 4544 inputs are 35 groups of 128
and a ragged one of 64), so every K tile of the kernel is one whole group; the activation is
never padded: its loads past ``in_features`` are masked to zero.

Per K tile (one group) a program unpacks the codes in registers, multiplies them (exact small
integers in the activation dtype) with the activation tile on the tensor cores, and scales the
partial product by the group's scale in float32, so the weight is never dequantized to memory.
(A variant that built the floats from bit patterns and split the activation into even and odd
columns, to avoid integer-to-float conversions and the interleave, measured slower on an H200 at
every M: see docs/PERFORMANCE.md.)
Small M splits the K loop across programs (see :mod:`.tiling`); the partial sums are added in
float32 afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.capability import interpreting
from compiler_core.backends.torch.cuda.dot import tile_dot
from compiler_core.backends.torch.cuda.tiling import MIN_GROUP_SIZE, k_range, plan


@dataclass(frozen=True)
class Int4Weight:
    """A packed int4 weight in the kernel's layout (rows padded to whole groups) and its scales."""

    packed: torch.Tensor  # int8 [out, groups * group_size / 2]
    scales: torch.Tensor  # float32 [out, groups]
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


def prepare_int4_weight(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """The kernel's operands of a checkpoint int4 weight (``[out, in / 2]`` int8, ``[out, groups]`` scales)."""
    in_features = packed.shape[1] * 2
    pad_codes = scales.shape[1] * group_size - in_features
    # A zero byte holds two zero codes: the padded inputs meet a weight of exactly 0.
    padded = F.pad(packed, (0, pad_codes // 2)) if pad_codes else packed
    return Int4Weight(padded.contiguous(), scales.float().contiguous(), in_features, group_size)


@triton.jit
def _int4_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ys,
    stride_ym,
    k_tiles,
    tiles_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    rb = tl.arange(0, GROUP // 2)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for t in range(first, last):
        k = t * GROUP + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        p = tl.load(w_ptr + rn[:, None] * stride_wn + t * (GROUP // 2) + rb[None, :], mask=n_ok[:, None], other=0)
        p = p.to(tl.int32)  # sign-extends the byte: its high nibble is then p >> 4 (arithmetic)
        lo = (p << 28) >> 28
        hi = p >> 4
        codes = tl.interleave(lo, hi).to(tl.float32).to(x.dtype)
        scale = tl.load(s_ptr + rn * stride_sn + t, mask=n_ok, other=0.0)
        acc += tile_dot(x, tl.trans(codes), WIDEN) * scale[None, :]
    if HAS_BIAS:
        # Only the first K split adds the bias: the splits' partial sums are added afterwards.
        acc += tl.load(bias_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the int4 weight ``W``; ``x [..., in_features]`` in bfloat16, float16 or float32
    (group size at least :data:`MIN_GROUP_SIZE`)."""
    if weight.group_size < MIN_GROUP_SIZE:
        raise ValueError(f"group size {weight.group_size} is below the kernel's minimum {MIN_GROUP_SIZE}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.out_features
    k_tiles = weight.packed.shape[1] * 2 // weight.group_size
    tiling = plan(m, n, k_tiles, x.device)
    per_split = k_range(k_tiles, tiling.split_k)
    splits = -(-k_tiles // per_split)
    if splits == 1:
        y = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (-(-n // tiling.block_n), -(-m // tiling.block_m), splits)
    _int4_gemm_kernel[grid](
        x2,
        weight.packed,
        weight.scales,
        bias if bias is not None else y,
        y,
        m,
        n,
        weight.in_features,
        x2.stride(0),
        weight.packed.stride(0),
        weight.scales.stride(0),
        y.stride(0),
        y.stride(1),
        k_tiles,
        per_split,
        GROUP=weight.group_size,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        HAS_BIAS=bias is not None,
        WIDEN=interpreting(),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    out = y[0] if splits == 1 else y.sum(0).to(x.dtype)
    return out.reshape(*lead, n)
