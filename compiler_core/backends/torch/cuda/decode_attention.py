"""Decode attention (one new token per row) over the static KV cache, split along the cache.

A KV head's query heads are the rows of one tile (MQA/GQA without repeating K or V: falcon-7b's
71 query heads read its single KV head once), so each score block is a tensor-core product. A
float8 cache is read as stored and dequantized in registers (``code * kv_scale``, rounded to the
query dtype as the cache's own read does), never as a whole-cache copy per step. The cache length
is split across programs (flash-decoding) so that batch 1 fills the GPU; a second kernel merges
the splits' partial softmaxes.

The mask is the static decode step's: ``[batch, cache_len]``, nonzero for the slots a row may
attend (its real tokens so far). Given the step's write offset (a device tensor, as the captured
step holds it), the programs stop there: no slot after it can be attended, so a cache allocated
longer than the sequences costs no reads. Only additive-free masks are handled here (no ALiBi
bias); the lowering keeps such models on the torch kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.capability import interpreting
from compiler_core.backends.torch.cuda.dot import tile_dot
from compiler_core.backends.torch.cuda.tiling import PROGRAMS_PER_SM, multiprocessors

BLOCK_L = 64


@triton.jit
def _decode_attention_split(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    kv_scale_ptr,
    last_column_ptr,
    acc_ptr,
    ml_ptr,
    groups,
    head_dim,
    cache_len,
    blocks_per_split,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_mb,
    NUM_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    QUANTIZED: tl.constexpr,
    WIDEN: tl.constexpr,
    BOUNDED: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch row * NUM_KV + kv head
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    b = pid_bh // NUM_KV
    kv = pid_bh % NUM_KV
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    rl = tl.arange(0, BLOCK_L)
    h_ok = rh < groups
    d_ok = rd < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + (kv * groups + rh)[:, None] * stride_qh + rd[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if QUANTIZED:
        kv_scale = tl.load(kv_scale_ptr)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    first = pid_s * blocks_per_split
    stop = first + blocks_per_split
    end = cache_len
    if BOUNDED:  # nothing after the last attendable column is read, whole blocks not even visited
        end = tl.minimum(cache_len, tl.load(last_column_ptr).to(tl.int32) + 1)
        stop = tl.minimum(stop, (end + BLOCK_L - 1) // BLOCK_L)
    for blk in range(first, stop):
        pos = blk * BLOCK_L + rl
        in_cache = pos < end
        allowed = (tl.load(mask_ptr + b * stride_mb + pos, mask=in_cache, other=0) != 0) & in_cache
        kv_mask = in_cache[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + b * stride_kb + kv * stride_kh + pos[:, None] * stride_kl + rd[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_ptr + b * stride_vb + kv * stride_vh + pos[:, None] * stride_vl + rd[None, :], mask=kv_mask, other=0.0
        )
        if QUANTIZED:
            k = (k.to(tl.float32) * kv_scale).to(q.dtype)
            v = (v.to(tl.float32) * kv_scale).to(q.dtype)
        s = tile_dot(q, tl.trans(k), WIDEN) * softmax_scale
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed yet keep m = -inf; subtracting 0 then gives exp(-inf) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, WIDEN)
        m_i = m_new
    base = (pid_bh * splits + pid_s) * BLOCK_H
    tl.store(acc_ptr + (base + rh)[:, None] * BLOCK_D + rd[None, :], acc)
    tl.store(ml_ptr + (base + rh) * 2, m_i)
    tl.store(ml_ptr + (base + rh) * 2 + 1, l_i)


@triton.jit
def _decode_attention_merge(
    acc_ptr,
    ml_ptr,
    out_ptr,
    groups,
    head_dim,
    splits,
    stride_ob,
    stride_oh,
    NUM_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // NUM_KV
    kv = pid_bh % NUM_KV
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    m_max = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    for split in range(0, splits):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + ((pid_bh * splits + split) * BLOCK_H + rh) * 2))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    out = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for split in range(0, splits):
        row = (pid_bh * splits + split) * BLOCK_H + rh
        weight = tl.exp(tl.load(ml_ptr + row * 2) - m_max)
        total += tl.load(ml_ptr + row * 2 + 1) * weight
        out += tl.load(acc_ptr + row[:, None] * BLOCK_D + rd[None, :]) * weight[:, None]
    out = out / total[:, None]
    h_ok = rh < groups
    d_ok = rd < head_dim
    o = out_ptr + b * stride_ob + (kv * groups + rh)[:, None] * stride_oh + rd[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
    kv_scale: torch.Tensor | None = None,
    last_column: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q K^T * scale, masked) V for one query token per row.

    ``q [batch, heads, head_dim]``; ``k_cache``, ``v_cache [batch, kv_heads, cache_len, head_dim]``
    (the query dtype, or float8_e4m3fn with ``kv_scale``); ``mask [batch, cache_len]`` (nonzero =
    attend). Query head ``h`` reads KV head ``h // (heads / kv_heads)``. ``last_column``, a device
    tensor [1] (a static decode step's write offset), bounds the columns read: those after it are
    treated as masked without being loaded. Returns ``[batch, heads, head_dim]`` in the query dtype.
    """
    batch, heads, head_dim = q.shape
    num_kv, cache_len = k_cache.shape[1], k_cache.shape[2]
    groups = heads // num_kv
    block_h = max(16, triton.next_power_of_2(groups))
    block_d = max(16, triton.next_power_of_2(head_dim))
    blocks = -(-cache_len // BLOCK_L)
    wanted = PROGRAMS_PER_SM * multiprocessors(q.device) // (batch * num_kv)
    splits = triton.next_power_of_2(max(1, min(blocks, wanted)))
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)  # every split then holds at least one block and writes its partials
    acc = torch.empty((batch * num_kv, splits, block_h, block_d), dtype=torch.float32, device=q.device)
    ml = torch.empty((batch * num_kv, splits, block_h, 2), dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    quantized = kv_scale is not None
    _decode_attention_split[(batch * num_kv, splits)](
        q,
        k_cache,
        v_cache,
        mask,
        kv_scale if quantized else q,
        q if last_column is None else last_column,
        acc,
        ml,
        groups,
        head_dim,
        cache_len,
        per_split,
        softmax_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        mask.stride(0),
        NUM_KV=num_kv,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        BLOCK_L=BLOCK_L,
        QUANTIZED=quantized,
        WIDEN=interpreting(),
        BOUNDED=last_column is not None,
        num_warps=4,
        num_stages=2,
    )
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    _decode_attention_merge[(batch * num_kv,)](
        acc,
        ml,
        out,
        groups,
        head_dim,
        splits,
        out.stride(0),
        out.stride(1),
        NUM_KV=num_kv,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
