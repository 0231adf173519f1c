"""INT4 weight-only GEMM for every M, and the one-pass dequantization behind prefill.

The weight layout is the checkpoint's (``plugins/quant_awq/int4.py``): int8 ``[out, in / 2]``,
byte ``j`` of a row holding code ``2j`` in its low nibble and ``2j + 1`` in its high nibble, one
scale per group of ``group_size`` input channels. :func:`prepare_int4_weight` pads each row once,
at lowering time, to whole groups with zero codes (falcon-7b's 4544 inputs are 35 groups of 128
and a ragged one of 64); the activation is never padded: its loads past ``in_features`` are
masked to zero, and so are the weight loads past the padded row when a K tile spans several groups.

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
two at a time, as a pair of 16-bit halves in one register (:func:`_pairs`, a few lines of PTX;
on an H200 the decode GEMMs at 1 to 16 rows took 10-22% less time than through float32), and
with float32 ones through float32 patterns (:func:`_unpack`, also Triton's interpreter's path).

Either operand order of the tile product is a launch parameter (``swap_ab``, see :mod:`.dot`).
Small M splits the K loop across programs; the last split of each output tile adds the partial
sums in float32 (:mod:`.splitk`).

:func:`dequantize_int4` writes the dense weight in the compute dtype with one kernel, bit-exact
with ``dequantize_in_dtype``: prefill calls (compute-bound) run it and then cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.capability import interpreting
from compiler_core.backends.torch.cuda.dot import linear_acc, linear_dot, output_tile, per_column
from compiler_core.backends.torch.cuda.rounding import cast
from compiler_core.backends.torch.cuda.splitk import TileLocks, store_tile
from compiler_core.backends.torch.cuda.tiling import MIN_GROUP_SIZE, Config, config_for, resolve

#: Columns of the dense weight one dequantization program writes per row block (at least one group).
DEQUANT_BLOCK_K = 128
DEQUANT_BLOCK_N = 32


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

    @property
    def padded_in(self) -> int:
        """The row length in codes after padding to whole groups."""
        return self.packed.shape[1] * 2


def prepare_int4_weight(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """The kernel's operands of a checkpoint int4 weight (``[out, in / 2]`` int8, ``[out, groups]`` scales)."""
    in_features = packed.shape[1] * 2
    pad_codes = scales.shape[1] * group_size - in_features
    # A zero byte holds two zero codes: the padded inputs meet a weight of exactly 0.
    padded = F.pad(packed, (0, pad_codes // 2)) if pad_codes else packed
    return Int4Weight(padded.contiguous(), scales.float().contiguous(), in_features, group_size)


#: The bits of float32 2**23 + 8 (:data:`MAGIC`). XOR-ed with a code's nibble, they flip the
#: nibble's sign bit (code -> code + 8, in 0..15) and set the exponent of 2**23 above it, so the
#: float is 2**23 + code + 8, and subtracting :data:`MAGIC` leaves the code exactly.
MAGIC_BITS = tl.constexpr(0x4B000008)
MAGIC = tl.constexpr(8388616.0)


@triton.jit
def _unpack(p):
    """int8 bytes ``[R, C]`` -> float32 codes ``[R, 2C]`` (low nibble first, each in [-8, 7]).

    Built from bit patterns rather than by integer-to-float conversions, which Hopper issues at a
    quarter of the float rate. In an H200 sweep (docs/PERFORMANCE.md), with the weight as the left
    operand (``swap_ab``), this was faster at most decode sizes (by up to 14%) and 16% slower at
    one (qkv, 128 rows); in the other operand order it was within 7% either way. One logical
    operation per code (the XOR with :data:`MAGIC_BITS`) and one subtraction replace the conversion.
    """
    q = p.to(tl.int32)
    low = ((q & 0xF) ^ MAGIC_BITS).to(tl.float32, bitcast=True)
    high = (((q >> 4) & 0xF) ^ MAGIC_BITS).to(tl.float32, bitcast=True)
    return tl.interleave(low, high) - MAGIC


#: The bits of a pair of ``2**e + 8`` in a 16-bit dtype (``2**e``: its smallest power of two with a
#: unit of 1 in the last place, 128 in bfloat16 and 1024 in float16), of a pair of ``-(2**e + 8)``
#: and of a pair of ones: the constants of :func:`_pairs_asm`.
BF16_PAIRS = (0x43084308, 0xC308C308, 0x3F803F80)
FP16_PAIRS = (0x64086408, 0xE408E408, 0x3C003C00)


def _pairs_asm(dtype: str, constants: tuple[int, int, int], scaled: bool) -> str:
    """PTX turning one byte (``$2``) into its two codes as a pair of ``dtype`` halves (``$0``: the
    low nibble's), each times the 16-bit scale ``$3`` with ``scaled``.

    ``byte * 0x1001`` puts a copy of the high nibble at bits 16-19, beside the low one at bits
    0-3; one ``lop3`` keeps both nibbles and XORs in the bits of two ``2**e + 8``, which flips each
    nibble's sign bit (code -> code + 8, in 0..15) under the exponent of ``2**e``; one paired
    ``fma`` subtracts ``2**e + 8`` exactly. The scale multiplies both halves with one rounding, as
    ``dequantize_in_dtype`` rounds ``code * scale`` once.
    """
    bits, minus, one = constants
    scale = f"mov.b32 s, {{$3, $3}}; mul.rn.{dtype}x2 t, t, s; " if scaled else ""
    return (
        "{ .reg .b32 t, s, one, minus; "
        "mul.lo.u32 t, $2, 4097; "
        f"lop3.b32 t, t, 0x000F000F, {bits:#x}, 0x6a; "
        f"mov.b32 one, {one:#x}; mov.b32 minus, {minus:#x}; "
        f"fma.rn.{dtype}x2 t, t, one, minus; "
        f"{scale}mov.b32 {{$0, $1}}, t; }}"
    )


#: Activation dtypes whose codes the GEMM builds in pairs (:func:`_pairs`; not under the
#: interpreter, which runs no PTX): float32 activations take :func:`_unpack`.
PAIRED_DTYPES = (torch.bfloat16, torch.float16)
BF16_CODES = tl.constexpr(_pairs_asm("bf16", BF16_PAIRS, scaled=False))
FP16_CODES = tl.constexpr(_pairs_asm("f16", FP16_PAIRS, scaled=False))
BF16_SCALED = tl.constexpr(_pairs_asm("bf16", BF16_PAIRS, scaled=True))
FP16_SCALED = tl.constexpr(_pairs_asm("f16", FP16_PAIRS, scaled=True))


@triton.jit
def _pairs(p, scales, dtype: tl.constexpr, SCALED: tl.constexpr):
    """int8 bytes ``[R, C]`` -> their codes ``[R, 2C]`` in ``dtype`` (bfloat16 or float16), exactly;
    with ``SCALED``, each byte's codes times its scale (``scales``, float32 ``[R, C]``) rounded once.

    Four instructions per byte (two codes; two more with the scale), where :func:`_unpack` takes
    six per code: the codes are built as pairs of ``dtype`` bit patterns and corrected with paired
    arithmetic (:func:`_pairs_asm`).
    """
    q = p.to(tl.uint8, bitcast=True).to(tl.int32)
    if SCALED:
        s = scales.to(dtype)  # exact: the scales are values of the compute dtype
        if dtype == tl.bfloat16:
            low, high = tl.inline_asm_elementwise(
                BF16_SCALED, "=h,=h,r,h", [q, s], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1
            )
        else:
            low, high = tl.inline_asm_elementwise(
                FP16_SCALED, "=h,=h,r,h", [q, s], dtype=(tl.float16, tl.float16), is_pure=True, pack=1
            )
    elif dtype == tl.bfloat16:
        low, high = tl.inline_asm_elementwise(
            BF16_CODES, "=h,=h,r", [q], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1
        )
    else:
        low, high = tl.inline_asm_elementwise(
            FP16_CODES, "=h,=h,r", [q], dtype=(tl.float16, tl.float16), is_pure=True, pack=1
        )
    return tl.interleave(low, high)


@triton.jit
def _column_scales(
    s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr
):
    """The scales of a weight tile's rows ``rn`` over K columns ``k0 .. k0 + BLOCK_K``, as float32
    ``[BLOCK_N, WIDTH]``: one per code (``WIDTH == BLOCK_K``) or per byte (``BLOCK_K // 2``)."""
    if BLOCK_K >= GROUP:
        # Whole groups per tile: one scale per (row, group), broadcast over the group's columns.
        PER_TILE: tl.constexpr = BLOCK_K // GROUP
        g = k0 // GROUP + tl.arange(0, PER_TILE)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=n_ok[:, None] & (g[None, :] < groups), other=0.0)
        per_group = tl.broadcast_to(s[:, :, None], (rn.shape[0], PER_TILE, WIDTH // PER_TILE))
        out = tl.reshape(per_group, (rn.shape[0], WIDTH))
    else:
        # The tile lies inside one group.
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
        out = tl.broadcast_to(s[:, None], (rn.shape[0], WIDTH))
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
    M,
    N,
    K,
    K_PADDED,
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
    PAIRED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 2)
    m_ok = rm < M
    n_ok = rn < N
    groups = K_PADDED // GROUP
    acc = linear_acc(BLOCK_M, BLOCK_N, SWAP)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    for t in range(first, last):
        k0 = t * BLOCK_K
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        b = t * (BLOCK_K // 2) + rb
        p = tl.load(
            w_ptr + rn[:, None] * stride_wn + b[None, :],
            mask=n_ok[:, None] & (b[None, :] < K_PADDED // 2),
            other=0,
        )
        if SCALE_CODES:
            # (code * scale) is exact in float32 (a 4-bit times a bf16/fp16 significand); either
            # form rounds it once, as dequantize_in_dtype does.
            if PAIRED:
                scales = _column_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP, BLOCK_K, BLOCK_K // 2)
                w = _pairs(p, scales, x.dtype, True)
            else:
                scales = _column_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP, BLOCK_K, BLOCK_K)
                w = cast(_unpack(p) * scales, x.dtype, WIDEN)
            acc += linear_dot(x, w, WIDEN, SWAP)
        else:
            codes = _pairs(p, p, x.dtype, False) if PAIRED else _unpack(p).to(x.dtype)
            scale = tl.load(s_ptr + rn * stride_sn + t, mask=n_ok, other=0.0)
            acc += linear_dot(x, codes, WIDEN, SWAP) * per_column(scale, SWAP)
    if HAS_BIAS:
        # Only the first K split adds the bias: the splits' partial sums are added afterwards.
        acc += per_column(tl.load(bias_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32), SWAP)
    lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
    store_tile(output_tile(acc, SWAP), y_ptr, part_ptr, lock, rm, rn, M, N, stride_ym, pid_k, n_splits, SPLIT, WIDEN)


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
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the int4 weight ``W``; ``x [..., in_features]`` in bfloat16, float16 or float32
    (group size at least :data:`MIN_GROUP_SIZE`). ``config``: the launch (default: the tiling table's).
    ``locks``: the split-K counters the caller keeps for this weight (default: fresh ones)."""
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
    k_tiles = -(-weight.padded_in // block_k)
    tiling = resolve(config, m, n, k_tiles, block_k, x.device, x_bytes=x.element_size(), w_bits=4)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int4_gemm_kernel[tiling.grid(m, n)](
        x2,
        weight.packed,
        weight.scales,
        bias if bias is not None else y,
        y,
        tiling.partials(m, n, y),
        (locks or TileLocks(x.device)).for_tiles(tiling.tiles(m, n)),
        m,
        n,
        weight.in_features,
        weight.padded_in,
        x2.stride(0),
        weight.packed.stride(0),
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
    K_PADDED,
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
    b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b_ok = b[None, :] < K_PADDED // 2
    p = tl.load(w_ptr + rn[:, None] * stride_wn + b[None, :], mask=n_ok[:, None] & b_ok, other=0)
    w = _unpack(p) * _column_scales(s_ptr, rn, n_ok, stride_sn, k0, K_PADDED // GROUP, GROUP, BLOCK_K, BLOCK_K)
    # Exact in float32, rounded once by the cast: dequantize_in_dtype's rounding.
    w = cast(w, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w, mask=n_ok[:, None] & (k[None, :] < K))


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in_features]`` weight in ``dtype`` (one kernel; bit-exact with ``dequantize_in_dtype``
    on the same scales in ``dtype``)."""
    n, k = weight.out_features, weight.in_features
    out = torch.empty((n, k), dtype=dtype, device=weight.packed.device)
    block_k = max(DEQUANT_BLOCK_K, weight.group_size)  # whole groups per tile
    if block_k % weight.group_size:
        raise ValueError(f"group size {weight.group_size} does not divide the dequantization tile {block_k}")
    grid = (-(-n // DEQUANT_BLOCK_N), -(-k // block_k))
    _int4_dequant_kernel[grid](
        weight.packed,
        weight.scales,
        out,
        n,
        k,
        weight.padded_in,
        weight.packed.stride(0),
        weight.scales.stride(0),
        out.stride(0),
        GROUP=weight.group_size,
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=block_k,
        INTERPRETED=interpreting(),
        num_warps=4,
    )
    return out
