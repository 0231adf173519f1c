"""FP8 and INT4 GEMVs for decode calls of a few rows: one launch, no tensor cores, no split-K.

At one row a linear is a pass over its weight, and the GEMM kernels lose time around that pass:
a tensor-core tile pads the row to 16, and split-K adds two launches (the float32 sum of the
partials and its cast) to a call whose weight streams in 5-30 us. Here each program owns a
block of ``BLOCK_N`` output channels of one activation row and walks the whole K loop itself, so
the result is rounded once, in the kernel, to the activation dtype. The products are float32
FMAs on weights widened in registers; enough programs (``N / BLOCK_N``) are resident to keep
loads in flight. Rows are the grid's fastest axis, so a call of a few rows reads each weight
block from memory once and from the L2 for the other rows.

Numerics are the GEMM kernels' (:mod:`.fp8_gemm`, :mod:`.int4_gemm`):

* FP8: ``sat(x / x_scale)`` rounded to the nearest E4M3 code (ties to even), times the E4M3
  weight, accumulated in float32, times ``x_scale * w_scale`` (+ bias).
* INT4: each group's codes meet the activation in float32 and the group's partial sum is scaled
  by the group's scale, as the INT4 GEMM's ``block_k == 0`` form does. The packed bytes are read
  as 32-bit words of eight codes; a code becomes a float without an integer conversion, by
  placing its offset-binary nibble into the mantissa of 2**23 and subtracting 2**23 + 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.fp8_gemm import E4M3_MAX, round_to_e4m3
from compiler_core.backends.torch.cuda.int4_gemm import Int4Weight
from compiler_core.backends.torch.cuda.tiling import Config, config_for

#: Rows up to which the lowerings offer the GEMVs (beyond, the weight's re-reads from the L2 and the
#: per-row FMA work outgrow a tensor-core tile).
GEMV_MAX_ROWS = 4
#: Codes per packed 32-bit word of the INT4 weight.
CODES_PER_WORD = 8
#: float32 2**23 with a nibble in its low mantissa bits is 2**23 + nibble; with the sign bit of
#: the nibble flipped (offset binary) that is 2**23 + 8 + code.
_MAGIC_BITS = tl.constexpr(0x4B000008)
_MAGIC = tl.constexpr(8388616.0)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    x_scale = tl.load(x_scale_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + row * stride_xm + k, mask=k_ok, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xq = round_to_e4m3(tl.clamp(tl.math.div_rn(x.to(tl.float32), x_scale), -E4M3_MAX, E4M3_MAX))
        acc += w.to(tl.float32) * xq[None, :]
    y = tl.sum(acc, axis=1) * (x_scale * tl.load(w_scale_ptr))
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    WORDS,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    GROUPS_PER_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    nibble = tl.arange(0, 8)
    n_ok = rn < N
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    acc = tl.zeros((BLOCK_N, GROUPS_PER_TILE), dtype=tl.float32)
    for w0 in range(0, WORDS, BLOCK_W):
        w_idx = w0 + rw
        words = tl.load(w_ptr + rn[:, None] * stride_wn + w_idx[None, :], mask=n_ok[:, None] & (w_idx < WORDS)[None, :])
        k = w_idx[:, None] * 8 + nibble[None, :]
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        bits = ((words[:, :, None] >> (nibble * 4)[None, None, :]) & 0xF) ^ _MAGIC_BITS
        codes = bits.to(tl.float32, bitcast=True) - _MAGIC
        partial = tl.sum(codes * x[None, :, :], axis=2)  # [BLOCK_N, BLOCK_W]: one word's eight products each
        if BLOCK_W >= WORDS_PER_GROUP:
            g = w0 // WORDS_PER_GROUP + tl.arange(0, GROUPS_PER_TILE)
            per_group = tl.sum(tl.reshape(partial, (BLOCK_N, GROUPS_PER_TILE, WORDS_PER_GROUP)), axis=2)
        else:
            g = w0 // WORDS_PER_GROUP + tl.zeros((1,), dtype=tl.int32)
            per_group = tl.sum(partial, axis=1, keep_dims=True)
        s = tl.load(
            s_ptr + rn[:, None] * stride_sn + g[None, :],
            mask=n_ok[:, None] & (g[None, :] * WORDS_PER_GROUP < WORDS),
            other=0.0,
        )
        acc += per_group * s
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """:func:`.fp8_gemm.fp8_linear`'s result for a few rows, in one launch.

    ``config``: ``block_n`` output channels per program, ``block_k`` (a power of two) the K step,
    ``num_warps`` / ``num_stages`` (the other fields are unused); default: the tiling table's
    ``fp8_gemv`` row.
    """
    n, k = weight.shape
    x2 = _rows(x, k)
    m = x2.shape[0]
    config = config or config_for("fp8_gemv", m, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(m, triton.cdiv(n, config.block_n))](
        x2,
        weight,
        x_scale,
        w_scale,
        bias if bias is not None else y,
        y,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y.reshape(*x.shape[:-1], n)


def int4_gemv(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """:func:`.int4_gemm.int4_linear`'s result for a few rows, in one launch.

    ``config``: ``block_n`` output channels per program, ``block_k`` the K step in codes (a power
    of two of at least 8 words' codes, dividing the group size or a multiple of it),
    ``num_warps`` / ``num_stages``; default: the tiling table's ``int4_gemv`` row.
    """
    n, k = weight.out_features, weight.in_features
    x2 = _rows(x, k)
    m = x2.shape[0]
    config = config or config_for("int4_gemv", m, n, k)
    block_w = config.block_k // CODES_PER_WORD
    wpg = weight.group_size // CODES_PER_WORD
    if block_w < 1 or block_w & (block_w - 1) or (block_w % wpg and wpg % block_w):
        raise ValueError(
            f"block_k {config.block_k}: not a power of two >= {CODES_PER_WORD} dividing or a multiple of "
            f"group {weight.group_size}"
        )
    words = weight.packed.view(torch.int32)  # [out, padded_in / 8]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int4_gemv_kernel[(m, triton.cdiv(n, config.block_n))](
        x2,
        words,
        weight.scales,
        bias if bias is not None else y,
        y,
        n,
        k,
        words.shape[1],
        x2.stride(0),
        words.stride(0),
        weight.scales.stride(0),
        y.stride(0),
        GROUP=weight.group_size,
        BLOCK_N=config.block_n,
        BLOCK_W=block_w,
        GROUPS_PER_TILE=max(1, block_w // wpg),
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y.reshape(*x.shape[:-1], n)
