"""The static decode step's rotary embedding, KV-cache write and query layout as one kernel.

Between a layer's fused QKV projection and the Triton decode attention the torch path runs about
five elementwise kernels for the rotary embedding (``x * cos``, rotate-half's negate and
concatenate, ``* sin``, the sum), an ``index_copy_`` per K and V into the cache and, with an FP8
cache, a widen / divide / clamp / cast per tensor before those: 7 to 15 launches per layer for a
few kilobytes of data, each costing more in launch latency than in memory traffic. At batch 1 these
small kernels are a large part of a decode step. :func:`rope_cache_write` does all of it in one
launch: it reads ``qkv [b, 1, (nh + 2 * nkv) * hd]`` once, rotates the Q and K heads, writes K and V
(encoded as the cache stores them) at the column held in the device tensor ``start_index`` (read
in the kernel, so the step stays capturable in a CUDA graph), and writes the rotated query as a
contiguous ``[b, nh, hd]`` tensor, the layout :func:`.decode_attention.decode_attention` reads.

It computes what the torch path computes, bit for bit: the same cos/sin tables (the ones the
forward pass memoises), the rotation of :func:`.rotary.rotate` (each product and the sum rounded
to the activation dtype as torch's eager ops round them), the FP8 encoding of
:meth:`compiler_core.runtime.context.CacheSlot._encode` (float32 true division, saturation to
+-448, round to nearest even). Roundings to bfloat16 and E4M3 are done in float32 arithmetic
(:mod:`.rounding`, ``round_to_e4m3``) because Triton's interpreter truncates (bfloat16) or rounds
ties away (float8) in its own conversions; on a GPU the conversions that follow are then exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.fp8_gemm import E4M3_MAX, round_to_e4m3
from compiler_core.backends.torch.cuda.rotary import partner_channels, rotate
from compiler_core.backends.torch.cuda.rounding import rounded


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    scale_ptr,
    num_heads,
    num_kv,
    head_dim,
    rot_dim,
    max_len,
    stride_xb,
    stride_xd,
    stride_cb,
    stride_cd,
    stride_qb,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    ROTATE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (batch row, head of the fused projection): Q heads, then K heads, then V heads.
    row = tl.program_id(0)
    head = tl.program_id(1)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < head_dim
    base = qkv_ptr + row * stride_xb + head * head_dim * stride_xd
    x = tl.load(base + rd * stride_xd, mask=d_ok, other=0.0)
    dtype = x.dtype
    y = x.to(tl.float32)
    if ROTATE:
        # rotate_half over the first rot_dim channels: channel i < half pairs with -x[i + half],
        # channel half <= i < rot_dim with x[i - half]; channels from rot_dim on pass through.
        half = rot_dim // 2
        in_rot = (rd < rot_dim) & (head < num_heads + num_kv)
        xp = tl.load(base + partner_channels(rd, half) * stride_xd, mask=in_rot, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + row * stride_cb + rd * stride_cd, mask=in_rot, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_cb + rd * stride_cd, mask=in_rot, other=0.0).to(tl.float32)
        y = rotate(y, xp, c, s, rd < half, in_rot, dtype)
    if head < num_heads:
        tl.store(q_ptr + row * stride_qb + head * head_dim + rd, rounded(y, dtype), mask=d_ok)
    else:
        col = tl.load(start_ptr)
        is_k = head < num_heads + num_kv
        kv = tl.where(is_k, head - num_heads, head - num_heads - num_kv)
        if is_k:
            out = k_ptr + row * stride_kb + kv * stride_kh + col * stride_kl + rd * stride_kd
        else:
            out = v_ptr + row * stride_vb + kv * stride_vh + col * stride_vl + rd * stride_vd
        if QUANTIZED:
            code = tl.clamp(tl.math.div_rn(y, tl.load(scale_ptr)), -E4M3_MAX, E4M3_MAX)
            value = round_to_e4m3(code).to(tl.float8e4nv)
        else:
            value = rounded(y, k_ptr.dtype.element_ty)
        # A column past the cache would write another row's (or no tensor's) memory; index_copy_
        # raises there, this kernel writes nothing.
        tl.store(out, value, mask=d_ok & (col >= 0) & (col < max_len))


def rope_cache_write(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start_index: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate Q and K of one decode token per row, write K and V into the cache, return Q.

    ``qkv [b, 1, (num_heads + 2 * num_kv_heads) * head_dim]`` is the fused projection (any row
    stride). ``cos``, ``sin [b or 1, 1, 1, rot_dim]`` in ``qkv``'s dtype are the rotary tables
    (:func:`compiler_core.backends.torch.kernels.rotary_tables`; ``rot_dim <= head_dim``, the
    channels after it are not rotated), or None for no rotation. ``k_cache``, ``v_cache
    [B >= b, num_kv_heads, max_len, head_dim]`` receive rows ``0..b-1`` at column ``start_index``
    (a device tensor of one int64), encoded as ``CacheSlot._encode`` does: cast to the cache dtype,
    or with ``kv_scale`` divided by it, saturated and rounded to float8_e4m3fn. Returns the
    (rotated) query as a contiguous ``[b, num_heads, head_dim]`` tensor in ``qkv``'s dtype.
    """
    b, s, width = qkv.shape
    if s != 1 or width != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not one token of {num_heads}+2x{num_kv_heads} heads of {head_dim}")
    if kv_scale is not None and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"a scaled KV cache must be float8_e4m3fn, got {k_cache.dtype}")
    rotate = cos is not None
    if rotate:
        rot_dim = cos.shape[-1]
        if rot_dim > head_dim or rot_dim % 2 or cos.dtype != qkv.dtype or sin.stride() != cos.stride():
            raise ValueError(f"rotary tables {tuple(cos.shape)} {cos.dtype} do not fit heads of {head_dim} {qkv.dtype}")
        # Tables of one row (positions shared by the batch) broadcast as torch's product does.
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_cd = cos.stride(-1)
    else:
        cos = sin = qkv  # never read
        rot_dim, stride_cb, stride_cd = 0, 0, 1
    q = torch.empty((b, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b, num_heads + 2 * num_kv_heads)](
        qkv,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        start_index,
        kv_scale if kv_scale is not None else q,
        num_heads,
        num_kv_heads,
        head_dim,
        rot_dim,
        k_cache.shape[2],
        qkv.stride(0),
        qkv.stride(2),
        stride_cb,
        stride_cd,
        q.stride(0),
        *k_cache.stride(),
        *v_cache.stride(),
        ROTATE=rotate,
        QUANTIZED=kv_scale is not None,
        BLOCK_D=triton.next_power_of_2(head_dim),
        # No fused multiply-adds: a float32 engine's x * cos + rotate_half(x) * sin is two
        # rounded products and a rounded sum in torch, and a contraction would round once less.
        enable_fp_fusion=False,
        num_warps=1,
    )
    return q
