"""INT4 weight-only GEMM for every M, and the one-pass dequantization behind prefill.

The checkpoint's int4 weight (int8 ``[out, in / 2]``, two codes a byte, one scale per group of
``group_size`` input channels) is rewritten once, at lowering time, into the kernel's layout
(:mod:`.int4_layout`: int32 words in an order the tensor cores read directly), each row padded
with zero codes to whole groups and whole blocks of 128 (falcon-7b's 4544 inputs are 35 groups
of 128 and a ragged one of 64). The activation is never padded: its loads past ``in_features``
are masked to zero.

The GEMM has two forms, chosen per launch by the tiling table (:mod:`.tiling`, ``block_k``):

* ``block_k == 0`` (the original form): each K tile is one group; the codes (exact small integers
  in the activation dtype) meet the activation on the tensor cores and the partial product is
  scaled by the group's scale in float32.
* ``block_k > 0``: the codes are scaled in registers into the compute dtype, ``(code * scale)``
  rounded once, which is exactly the reference dequantization (``dequantize_in_dtype``), so one
  tensor-core product covers a K tile of several groups (or part of one) and the per-group
  float32 rescale of the accumulator disappears. ``block_k`` must be a multiple of the group
  size or divide it.

Codes are built from bit patterns, not by integer-to-float conversions: with 16-bit activations
two at a time in PTX, as a pair of 16-bit halves in one register, and with float32 ones (and
under Triton's interpreter) through float32 patterns (:func:`.int4_layout.tile_codes`).

Either operand order of the tile product is a launch parameter (``swap_ab``, see :mod:`.dot`).
Small M splits the K loop across programs; the last split of each output tile adds the partial
sums in float32 (:mod:`.splitk`).

:func:`dequantize_int4` writes the dense weight in the compute dtype with one kernel, bit-exact
with ``dequantize_in_dtype``: prefill calls (compute-bound) run it and then cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.capability import interpreting
from compiler_core.backends.torch.cuda.dot import linear_acc, linear_dot, output_tile, per_column
from compiler_core.backends.torch.cuda.epilogue import NONE, Epilogue
from compiler_core.backends.torch.cuda.int4_layout import (
    BLOCK_CODES,
    load_tile_words,
    tile_codes,
    word_scales,
    words_of,
)
from compiler_core.backends.torch.cuda.rounding import cast
from compiler_core.backends.torch.cuda.splitk import TileLocks, store_tile
from compiler_core.backends.torch.cuda.tiling import MIN_GROUP_SIZE, Config, config_for, resolve

#: Columns of the dense weight one dequantization program writes per row block (at least one group).
DEQUANT_BLOCK_K = 128
DEQUANT_BLOCK_N = 32


@dataclass(frozen=True)
class Int4Weight:
    """An int4 weight in the kernel's layout (:mod:`.int4_layout`; rows padded with zero codes to
    whole blocks of 128 and whole groups) and its group scales."""

    words: torch.Tensor  # int32 [out, padded_in / 8]
    scales: torch.Tensor  # float32 [out, groups]
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    @property
    def padded_in(self) -> int:
        """The row length in codes after padding."""
        return self.words.shape[1] * 8


def prepare_int4_weight(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """The kernel's operands of a checkpoint int4 weight (``[out, in / 2]`` int8, ``[out, groups]`` scales)."""
    in_features = packed.shape[1] * 2
    block = max(BLOCK_CODES, group_size)  # both powers of two
    padded_in = -(-scales.shape[1] * group_size // block) * block
    # Zero codes: the padded inputs meet a weight of exactly 0.
    return Int4Weight(words_of(packed, padded_in), scales.float().contiguous(), in_features, group_size)


#: Activation dtypes whose codes the GEMM builds in pairs in PTX (:func:`.int4_layout.tile_codes`;
#: not under the interpreter, which runs no PTX): float32 activations take float32 codes.
PAIRED_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _column_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scales of a weight tile's rows ``rn`` over K columns ``k0 .. k0 + BLOCK_K``, one per code:
    float32 ``[BLOCK_N, BLOCK_K]``."""
    if BLOCK_K >= GROUP:
        # Whole groups per tile: one scale per (row, group), broadcast over the group's columns.
        PER_TILE: tl.constexpr = BLOCK_K // GROUP
        g = k0 // GROUP + tl.arange(0, PER_TILE)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=n_ok[:, None] & (g[None, :] < groups), other=0.0)
        out = tl.reshape(tl.broadcast_to(s[:, :, None], (rn.shape[0], PER_TILE, GROUP)), (rn.shape[0], BLOCK_K))
    else:
        # The tile lies inside one group.
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
        out = tl.broadcast_to(s[:, None], (rn.shape[0], BLOCK_K))
    return out


@triton.jit
def _int4_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    lock_ptr,
    scale_ptr,
    M,
    N,
    K,
    k_words,
    groups,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    k_tiles,
    tiles_per_split,
    n_splits,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_CODES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    SWAP: tl.constexpr,
    WIDEN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COLUMN_SCALE: tl.constexpr,
    PAIRED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = linear_acc(BLOCK_M, BLOCK_N, SWAP)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for t in range(first, last):
        k0 = t * BLOCK_K
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        words = load_tile_words(w_ptr, rn, n_ok, stride_wn, k0, k_words, BLOCK_K)
        if SCALE_CODES:
            # (code * scale) is exact in float32 (a 4-bit times a bf16/fp16 significand); either
            # form rounds it once, as dequantize_in_dtype does.
            if PAIRED:
                scales = word_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP, BLOCK_K)
                w = tile_codes(words, scales, x.dtype, BLOCK_K, True, True)
            else:
                codes = tile_codes(words, words, x.dtype, BLOCK_K, False, False)
                scales = _column_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP, BLOCK_K)
                w = cast(codes * scales, x.dtype, WIDEN)
            acc += linear_dot(x, w, WIDEN, SWAP)
        else:
            codes = tile_codes(words, words, x.dtype, BLOCK_K, PAIRED, False).to(x.dtype)
            scale = tl.load(s_ptr + rn * stride_sn + t, mask=n_ok, other=0.0)
            acc += linear_dot(x, codes, WIDEN, SWAP) * per_column(scale, SWAP)
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


def check_config(config: Config, group_size: int) -> None:
    """Raise ValueError unless ``config`` can run the INT4 GEMM at ``group_size``."""
    bk = config.block_k
    if bk and (bk < 16 or bk & (bk - 1) or (bk % group_size and group_size % bk)):
        raise ValueError(f"block_k {bk}: not 0, nor a power of two >= 16 dividing or a multiple of {group_size}")


def int4_linear(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
    locks: TileLocks | None = None,
    epilogue: Epilogue = NONE,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the int4 weight ``W``; ``x [..., in_features]`` in bfloat16, float16 or float32
    (group size at least :data:`MIN_GROUP_SIZE`). ``config``: the launch (default: the tiling table's).
    ``locks``: the split-K counters the caller keeps for this weight (default: fresh ones).
    ``epilogue``: applied to the output before its rounding (:mod:`.epilogue`)."""
    if weight.group_size < MIN_GROUP_SIZE:
        raise ValueError(f"group size {weight.group_size} is below the kernel's minimum {MIN_GROUP_SIZE}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.out_features
    if config is None:
        config = config_for("int4", m, n, weight.in_features)
    check_config(config, weight.group_size)
    block_k = config.block_k or weight.group_size
    k_tiles = -(-weight.scales.shape[1] * weight.group_size // block_k)  # the padding past the groups holds zeros
    tiling = resolve(config, m, n, k_tiles, block_k, x.device, x_bytes=x.element_size(), w_bits=4)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int4_gemm_kernel[tiling.grid(m, n)](
        x2,
        weight.words,
        weight.scales,
        bias if bias is not None else y,
        y,
        tiling.partials(m, n, y),
        (locks or TileLocks(x.device)).for_tiles(tiling.tiles(m, n)),
        epilogue.scale_operand(n, y),
        m,
        n,
        weight.in_features,
        weight.words.shape[1],
        weight.scales.shape[1],
        x2.stride(0),
        weight.words.stride(0),
        weight.scales.stride(0),
        y.stride(0),
        k_tiles,
        tiling.tiles_per_split,
        tiling.split_k,
        GROUP=weight.group_size,
        BLOCK_M=tiling.block_m,
        BLOCK_N=tiling.block_n,
        BLOCK_K=block_k,
        SCALE_CODES=config.block_k > 0,
        HAS_BIAS=bias is not None,
        SPLIT=tiling.split_k > 1,
        SWAP=config.swap_ab,
        WIDEN=interpreting(),
        ACTIVATION=epilogue.activation,
        COLUMN_SCALE=epilogue.column_scale is not None,
        PAIRED=x.dtype in PAIRED_DTYPES and not interpreting(),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return y.reshape(*lead, n)


@triton.jit
def _int4_dequant_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    k_words,
    groups,
    stride_wn,
    stride_sn,
    stride_on,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k0 = pid_k * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    words = load_tile_words(w_ptr, rn, n_ok, stride_wn, k0, k_words, BLOCK_K)
    codes = tile_codes(words, words, tl.float32, BLOCK_K, False, False)
    w = codes * _column_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP, BLOCK_K)
    # Exact in float32, rounded once by the cast: dequantize_in_dtype's rounding.
    w = cast(w, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w, mask=n_ok[:, None] & (k[None, :] < K))


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in_features]`` weight in ``dtype`` (one kernel; bit-exact with ``dequantize_in_dtype``
    on the same scales in ``dtype``)."""
    n, k = weight.out_features, weight.in_features
    out = torch.empty((n, k), dtype=dtype, device=weight.words.device)
    block_k = max(DEQUANT_BLOCK_K, weight.group_size)  # whole groups and layout blocks per tile
    if block_k % weight.group_size:
        raise ValueError(f"group size {weight.group_size} does not divide the dequantization tile {block_k}")
    grid = (-(-n // DEQUANT_BLOCK_N), -(-k // block_k))
    _int4_dequant_kernel[grid](
        weight.words,
        weight.scales,
        out,
        n,
        k,
        weight.words.shape[1],
        weight.scales.shape[1],
        weight.words.stride(0),
        weight.scales.stride(0),
        out.stride(0),
        GROUP=weight.group_size,
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=block_k,
        INTERPRETED=interpreting(),
        num_warps=4,
    )
    return out
