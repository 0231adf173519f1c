"""A prompt pass's rotary embedding of the Q and K heads as one kernel.

The torch path rotates ``[b, heads, s, head_dim]`` with five elementwise kernels (``x * cos``,
rotate-half's negate and concatenate, ``* sin``, the sum), each reading and writing the whole
tensor: on an H200, 2.3 ms of a 1024-token falcon-7b prompt pass (32 layers), far below the memory
bandwidth. :func:`rotary` reads the fused projection once and writes the rotated heads once.

It computes what the torch path computes, bit for bit: :func:`rotate` (shared with
:mod:`.rope_cache`) rounds each product and the sum to the activation dtype as torch's eager ops
round them, and the kernel runs without fused multiply-adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.rounding import rounded

#: Tokens per program: a [BLOCK_T, head_dim] tile of one head.
BLOCK_T = 16


@triton.jit
def partner_channels(rd, half):
    """The rotate-half partner of each channel ``rd`` below ``2 * half``: ``i + half`` for the lower
    half, ``i - half`` for the upper."""
    return tl.where(rd < half, rd + half, rd - half)


@triton.jit
def rotate(y, partners, cos, sin, lower_half, in_rot, DTYPE: tl.constexpr):
    """float32 ``y * cos + rotate_half(y) * sin`` where ``in_rot``, ``y`` elsewhere, rounded as torch's
    eager ops round it (each product and the sum to ``DTYPE``; the caller launches without fused
    multiply-adds). ``partners``: ``y``'s rotate-half partners (:func:`partner_channels`) as float32,
    negated here for the ``lower_half`` channels."""
    xp = tl.where(lower_half, -partners, partners)
    # Each product of two activation-dtype values is exact in float32; rounding it (and the sum)
    # to the activation dtype is what torch's three eager kernels do.
    a = rounded(y * cos, DTYPE).to(tl.float32)
    b = rounded(xp * sin, DTYPE).to(tl.float32)
    return tl.where(in_rot, rounded(a + b, DTYPE).to(tl.float32), y)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    seq,
    head_dim,
    rot_dim,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_ob,
    stride_oh,
    stride_os,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    blocks = tl.cdiv(seq, BLOCK_T)
    row = tl.program_id(0) // blocks
    rt = (tl.program_id(0) % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    rd = tl.arange(0, BLOCK_D)
    t_ok = rt < seq
    ok = t_ok[:, None] & (rd < head_dim)[None, :]
    base = x_ptr + row * stride_xb + head * stride_xh + rt[:, None] * stride_xs
    x = tl.load(base + rd[None, :] * stride_xd, mask=ok, other=0.0)
    dtype = x.dtype
    y = x.to(tl.float32)
    # rotate_half over the first rot_dim channels: channel i < half pairs with -x[i + half],
    # channel half <= i < rot_dim with x[i - half]; channels from rot_dim on pass through.
    half = rot_dim // 2
    in_rot = t_ok[:, None] & (rd < rot_dim)[None, :]
    xp = tl.load(base + partner_channels(rd, half)[None, :] * stride_xd, mask=in_rot, other=0.0).to(tl.float32)
    table = row * stride_cb + rt[:, None] * stride_cs + rd[None, :] * stride_cd
    c = tl.load(cos_ptr + table, mask=in_rot, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=in_rot, other=0.0).to(tl.float32)
    y = rotate(y, xp, c, s, (rd < half)[None, :], in_rot, dtype)
    out = out_ptr + row * stride_ob + head * stride_oh + rt[:, None] * stride_os + rd[None, :]
    tl.store(out, rounded(y, dtype), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` over the first ``rot_dim`` channels of every head, the rest
    passed through, as :func:`compiler_core.backends.torch.kernels.apply_rotary` computes it.

    ``x [b, s, heads, head_dim]`` (any strides: a view of the fused projection); ``cos``, ``sin
    [b or 1, 1, s, rot_dim]`` in ``x``'s dtype (:func:`~compiler_core.backends.torch.kernels.rotary_tables`,
    ``rot_dim`` even and at most ``head_dim``). Returns ``[b, heads, s, head_dim]``, contiguous.
    """
    b, s, heads, head_dim = x.shape
    rot_dim = cos.shape[-1]
    if rot_dim > head_dim or rot_dim % 2 or cos.dtype != x.dtype or sin.stride() != cos.stride():
        raise ValueError(f"rotary tables {tuple(cos.shape)} {cos.dtype} do not fit heads of {head_dim} {x.dtype}")
    out = torch.empty((b, heads, s, head_dim), dtype=x.dtype, device=x.device)
    # Tables of one row (positions shared by the batch) broadcast as torch's product does.
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rotary_kernel[(b * triton.cdiv(s, BLOCK_T), heads)](
        x,
        cos,
        sin,
        out,
        s,
        head_dim,
        rot_dim,
        *x.stride(),
        stride_cb,
        cos.stride(2),
        cos.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_T=BLOCK_T,
        BLOCK_D=triton.next_power_of_2(head_dim),
        # No fused multiply-adds: torch rounds the two products and the sum separately.
        enable_fp_fusion=False,
        num_warps=2,
    )
    return out
