"""FP8 (E4M3) GEMM with static per-tensor scales and the activation quantization fused in.

``fp8_linear`` computes what ``plugins/quant_fp8`` defines: ``sat(x / x_scale)`` rounded to the
nearest E4M3 code, times the E4M3 weight, accumulated in float32, times ``x_scale * w_scale``
(+ bias), rounded to the activation dtype. The activation is read once, in its own dtype, and
quantized in registers per tile: no separate quantization kernel and no FP8 copy of it in memory.

On a GPU the tile product runs on the FP8 tensor cores (see :mod:`.dot` for the interpreter's
form). Small M splits the K loop across programs (see :mod:`.tiling`); the last split of a tile
adds the partial sums (:mod:`.splitk`). A one-row call quantizes only its row, not the zero rows
that pad it to the tensor cores' 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.capability import interpreting
from compiler_core.backends.torch.cuda.dot import linear_acc, linear_dot, output_tile, per_column
from compiler_core.backends.torch.cuda.epilogue import NONE, Epilogue
from compiler_core.backends.torch.cuda.splitk import TileLocks, store_tile
from compiler_core.backends.torch.cuda.tiling import Config, config_for, resolve

#: A constexpr: the kernels read it (Triton kernels see only constexpr globals).
E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def round_to_e4m3(v):
    """float32 ``v`` (|v| <= 448) rounded to the nearest E4M3 value, ties to even, still float32.

    Done in float32 arithmetic rather than by the float8 conversion alone, because Triton's
    interpreter converts with ties away from zero and drops the carry into the exponent; on a GPU
    the conversion that follows is then exact on both paths. Normal values keep 3 of float32's 23
    mantissa bits (round to nearest even on the bit pattern); below 2**-6 the codes are subnormal,
    multiples of 2**-9, which adding and subtracting 1.5 * 2**14 rounds to. A value that rounds to
    zero keeps its sign, as torch's cast keeps it (-0 is a code of its own in a KV cache).
    """
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000: sign, exponent, 3 bits
    subnormal = (v + 24576.0) - 24576.0
    out = tl.where(tl.abs(v) < 0.015625, subnormal, rounded.to(tl.float32, bitcast=True))
    # The sign bit of v onto the result: only a +0 from the subnormal sum changes (Triton negates as
    # 0 - x, which would give +0 again).
    return (out.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_e4m3(x, x_scale):
    """``sat(x / x_scale)`` rounded to the nearest E4M3 code (IEEE division, ties to even), as float32."""
    return round_to_e4m3(tl.clamp(tl.math.div_rn(x.to(tl.float32), x_scale), -E4M3_MAX, E4M3_MAX))


@triton.jit
def _fp8_gemm_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    lock_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    k_tiles,
    tiles_per_split,
    n_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_ROW: tl.constexpr,
    SPLIT: tl.constexpr,
    SWAP: tl.constexpr,
    WIDEN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COLUMN_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_scale = tl.load(x_scale_ptr)
    acc = linear_acc(BLOCK_M, BLOCK_N, SWAP)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for t in range(first, last):
        k = t * BLOCK_K + rk
        k_ok = k < K
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if ONE_ROW:
            # One real row in the tile: quantize it alone (the division and rounding cost ~25
            # instructions per element) and place it in the tile's first row, the others zero.
            xq_row = quantize_e4m3(tl.load(x_ptr + k, mask=k_ok, other=0.0), x_scale)
            xq = tl.where((rm == 0)[:, None], xq_row[None, :], 0.0).to(tl.float8e4nv)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xq = quantize_e4m3(x, x_scale).to(tl.float8e4nv)
        acc += linear_dot(xq, w, WIDEN, SWAP)
    acc = acc * (x_scale * tl.load(w_scale_ptr))
    if HAS_BIAS:
        # Only the first K split adds the bias: the splits' partial sums are added afterwards.
        acc += per_column(tl.load(bias_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32), SWAP)
    lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
    tile = output_tile(acc, SWAP)
    store_tile(
        tile,
        y_ptr,
        part_ptr,
        lock,
        rm,
        rn,
        M,
        N,
        stride_ym,
        pid_k,
        n_splits,
        SPLIT,
        WIDEN,
        scale_ptr,
        ACTIVATION,
        COLUMN_SCALE,
    )


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
    locks: TileLocks | None = None,
    epilogue: Epilogue = NONE,
) -> torch.Tensor:
    """``sat(x / x_scale) @ weight.T * (x_scale * w_scale) (+ bias)`` in ``x``'s dtype.

    ``weight`` is float8_e4m3fn ``[out, in]`` (row-major), the scales float32 tensors of one element.
    ``config``: the launch (default: the tiling table's row; its ``block_k`` a power of two >= 16).
    ``locks``: the split-K counters the caller keeps for this weight (default: fresh ones).
    ``epilogue``: applied to the output before its rounding (:mod:`.epilogue`).
    """
    lead = x.shape[:-1]
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if config is None:
        config = config_for("fp8", m, n, k)
    k_tiles = -(-k // config.block_k)
    tiling = resolve(config, m, n, k_tiles, config.block_k, x.device, x_bytes=x.element_size(), w_bits=8)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _fp8_gemm_kernel[tiling.grid(m, n)](
        x2,
        weight,
        x_scale,
        w_scale,
        bias if bias is not None else y,
        y,
        tiling.partials(m, n, y),
        (locks or TileLocks(x.device)).for_tiles(tiling.tiles(m, n)),
        epilogue.scale_operand(n, y),
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        k_tiles,
        tiling.tiles_per_split,
        tiling.split_k,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        HAS_BIAS=bias is not None,
        BLOCK_K=tiling.block_k,
        ONE_ROW=m == 1,
        SPLIT=tiling.split_k > 1,
        SWAP=config.swap_ab,
        WIDEN=interpreting(),
        ACTIVATION=epilogue.activation,
        COLUMN_SCALE=epilogue.column_scale is not None,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return y.reshape(*lead, n)
