"""Plain torch implementations of the core IR ops: the reference semantics of every op.

Each ``lower_*`` function receives the node and a :class:`TorchLowering` and returns a
kernel ``fn(ctx, *inputs) -> output``. Weights are looked up once, at lowering time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from compiler_core import rope
from compiler_core.backends.torch.cpu_linear import bf16_linear, bf16_storage, cpu_linear
from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.dtypes import IR_DTYPES, torch_dtype
from compiler_core.ir import Graph, Node
from compiler_core.runtime.context import ForwardContext

Kernel = Callable[..., torch.Tensor]


@dataclass
class TorchLowering:
    """The torch backend's lowering context: the rank's weights on their device, as the executor
    holds them (on CPU, a float32 weight of bfloat16 numbers may be held as bfloat16).

    ``param`` hands a kernel a weight in the dtype the graph declares; ``bf16_param`` hands it a
    weight held as bfloat16, for the CPU kernel that multiplies such weights (see
    :func:`bf16_storage`).
    """

    weights: Mapping[str, torch.Tensor]
    device: torch.device
    graph: Graph
    #: Weights held as bfloat16 for a float32 parameter, widened for a kernel that asked.
    widened: dict[str, torch.Tensor] = field(default_factory=dict)

    def param(self, node: Node, role: str) -> torch.Tensor | None:
        """The weight in the dtype the graph declares for it (widened, once, if it is held compact)."""
        name = node.params.get(role)
        if name is None:
            return None
        weight = self.weights[name]
        if weight.dtype == torch.bfloat16 and self.declared_dtype(name) == torch.float32:
            if name not in self.widened:
                self.widened[name] = weight.float()
            return self.widened[name]
        return weight

    def declared_dtype(self, name: str) -> torch.dtype | None:
        """The dtype the graph declares for weight ``name`` (None when it names no torch dtype)."""
        param = self.graph.params.get(name)
        return None if param is None or param.dtype not in IR_DTYPES else torch_dtype(param.dtype)

    def bf16_param(self, node: Node, role: str) -> torch.Tensor | None:
        """The weight if it is held as bfloat16 and the CPU kernel can multiply it, else None."""
        name = node.params.get(role)
        if name is None or self.weights[name].dtype != torch.bfloat16:
            return None
        return bf16_storage(self.weights[name])

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch_dtype(self.graph.attrs.get("dtype", "float32"))


def lower_embedding(node: Node, low: TorchLowering) -> Kernel:
    compact = low.bf16_param(node, "weight")
    if compact is not None:
        dtype = low.declared_dtype(node.params["weight"]) or low.weights[node.params["weight"]].dtype
        return lambda ctx, ids: F.embedding(ids, compact).to(dtype)
    weight = low.param(node, "weight")
    return lambda ctx, ids: F.embedding(ids, weight)


def lower_layer_norm(node: Node, low: TorchLowering) -> Kernel:
    weight, bias, eps = low.param(node, "weight"), low.param(node, "bias"), float(node.attrs["eps"])

    def torch_layer_norm(ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, weight.shape, weight, bias, eps)

    if triton_ready(low.device):
        fast = triton_layer_norm(node.name, weight, bias, eps, low.compute_dtype, torch_layer_norm)
        if fast is not None:
            return fast
    return torch_layer_norm


def triton_layer_norm(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, dtype: torch.dtype, reference: Kernel
) -> Kernel | None:
    """The one-program-per-row Triton LayerNorm (``cuda/layer_norm.py``), or None (with a warning) when
    the row does not fit it, or it fails or disagrees with ``reference`` on a probe."""
    from compiler_core.backends.torch.cuda import layer_norm as triton_ln

    if not triton_ln.supported(weight.shape[0]):
        return None

    def layer_norm(ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
        return triton_ln.layer_norm(x, weight, bias, eps)

    gen = torch.Generator(device=weight.device).manual_seed(0)
    probe = (torch.randn(3, weight.shape[0], generator=gen, device=weight.device) * 4 + 1).to(dtype)
    try:
        got, want = layer_norm(None, probe).float(), reference(None, probe).float()
    except Exception as exc:  # a Triton compile or launch failure on this GPU: keep the torch kernel
        warnings.warn(
            f"node {name}: the Triton LayerNorm failed ({type(exc).__name__}: {exc}); not using it", stacklevel=3
        )
        return None
    # Statistics summed in another order than ATen's: an ulp of the activation dtype at most.
    ulp = torch.finfo(dtype).eps
    if not torch.allclose(got, want, rtol=2 * ulp, atol=2 * ulp * float(want.abs().max())):
        warnings.warn(f"node {name}: the Triton LayerNorm disagrees with the reference; not using it", stacklevel=3)
        return None
    return layer_norm


def lower_rms_norm(node: Node, low: TorchLowering) -> Kernel:
    weight, eps = low.param(node, "weight"), float(node.attrs["eps"])

    def rms_norm(ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    return rms_norm


def lower_linear(node: Node, low: TorchLowering) -> Kernel:
    bias = low.param(node, "bias")
    compact = low.bf16_param(node, "weight")
    if compact is not None:
        compact_linear = bf16_linear(compact, bias)
        return lambda ctx, x: compact_linear(x)
    return dense_linear(low.param(node, "weight"), bias)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    """``x @ weight.T (+ bias)`` for a dense weight, through the CPU fast path where it applies."""
    fast = cpu_linear(weight, bias)
    if fast is not None:
        return lambda ctx, x: fast(x)
    return lambda ctx, x: F.linear(x, weight, bias)


def lower_bias_add(node: Node, low: TorchLowering) -> Kernel:
    bias = low.param(node, "bias")
    return lambda ctx, x: x + bias


def lower_gelu(node: Node, low: TorchLowering) -> Kernel:
    approximate = node.attrs.get("approximate", "none")
    return lambda ctx, x: F.gelu(x, approximate=approximate)


def lower_add(node: Node, low: TorchLowering) -> Kernel:
    return lambda ctx, a, b: a + b


def lower_mul(node: Node, low: TorchLowering) -> Kernel:
    return lambda ctx, a, b: a * b


def lower_all_reduce(node: Node, low: TorchLowering) -> Kernel:
    return lambda ctx, x: x if ctx.comm is None else ctx.comm.all_reduce(x)


def lower_all_gather(node: Node, low: TorchLowering) -> Kernel:
    axis = int(node.attrs["axis"])
    return lambda ctx, x: x if ctx.comm is None else ctx.comm.all_gather(x, axis)


def lower_narrow(node: Node, low: TorchLowering) -> Kernel:
    axis, start, length = (int(node.attrs[k]) for k in ("axis", "start", "length"))
    return lambda ctx, x: x.narrow(axis, start, length)


# --- attention -----------------------------------------------------------------------------


def alibi_slopes(total_heads: int) -> torch.Tensor:
    """ALiBi slopes for ``total_heads`` heads (Press et al.), including non-power-of-two counts."""
    closest = 2 ** math.floor(math.log2(total_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != total_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, total_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(remaining)]
    return torch.tensor(slopes, dtype=torch.float32)


def rotary_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, divisor: float | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [b, 1, s, dim] for GPT-NeoX style (rotate-half) rotary embeddings (see compiler_core.rope)."""
    pos = positions.float()
    if divisor is not None:
        pos = pos / divisor
    freqs = pos[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


#: The attention backends SDPA may pick: not cuDNN's, which builds an execution plan for every new
#: (query, key) length on the host. Measured on an H200 (torch 2.11, falcon-7b shape): 80-100 ms for
#: each new length, 1-2 s for the first, against a few ms of GPU work for a 128-token prefill;
#: serving, where every prompt chunk ends at another cache column, paid that on most prefills.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_bias(
    ctx: ForwardContext, seq: int, dtype: torch.dtype, alibi: tuple[torch.Tensor, float, torch.dtype] | None
) -> torch.Tensor:
    """Additive mask [b, heads or 1, seq, total]: causal + padding (+ ALiBi), finite minimum."""
    mask = ctx.attention_mask
    total = mask.shape[1]
    if ctx.start_index is not None:
        # Static shapes: the mask already hides every slot after the new tokens.
        allowed = (mask != 0)[:, None, None, :]
        if seq > 1:  # a prompt chunk: each token sees itself and the ones before it
            key_pos = torch.arange(total, device=mask.device)
            allowed = allowed & (key_pos[None, :] <= ctx.columns(seq)[:, None])[None, None]
    else:
        query_pos = torch.arange(ctx.start, ctx.start + seq, device=mask.device)
        key_pos = torch.arange(total, device=mask.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (mask[:, None, None, :] != 0)
    if alibi is None:
        bias = torch.zeros((), dtype=dtype, device=mask.device)
    else:
        slopes, scale, compute_dtype = alibi
        # The bias grows with the key's absolute position among real tokens, as in HF Falcon/BLOOM.
        key_index = (mask.long().cumsum(-1) - 1) * mask.long()
        bias = (slopes.to(compute_dtype)[None, :, None] * key_index[:, None, :]).to(dtype)
        bias = (bias * scale)[:, :, None, :]
    return torch.where(allowed, bias, torch.finfo(dtype).min)


def lower_attention(node: Node, low: TorchLowering) -> Kernel:
    a = node.attrs
    nh, nkv, hd = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    slot, kind = a["cache_slot"], a["position_embedding"]
    scale = float(a.get("softmax_scale", 1.0 / math.sqrt(hd)))
    frequencies = rope.inv_freq(a).to(low.device) if kind == "rope" else None
    divisor = rope.position_divisor(a)
    # Layers with the same rotation share one table per forward pass.
    rope_key = ("rope", tuple(frequencies.tolist()), divisor) if kind == "rope" else None
    alibi, alibi_key = None, None
    if kind == "alibi":
        offset = int(a.get("alibi_head_offset", 0))
        slopes = alibi_slopes(int(a.get("alibi_num_heads", nh)))[offset : offset + nh]
        compute = torch_dtype(a.get("alibi_compute_dtype", "float32"))
        alibi_key = ("alibi", offset, nh)
        alibi = (slopes.to(low.device), float(a.get("alibi_scale", 1.0)), compute)
    groups = nh // nkv
    fast_decode = fast_rope_cache = fast_rotary = None
    if alibi is None and triton_ready(low.device):
        # The Triton decode kernel reads the static cache as stored (an FP8 one too); ALiBi's
        # additive bias is not part of it. Before it, one Triton kernel rotates Q and K, writes
        # K and V into the cache and lays Q out for it: the torch path below runs ~7 small kernels
        # for that (~15 with an FP8 cache), a large part of a batch-1 decode step. Prompt passes
        # rotate Q and K in one Triton kernel instead of the rotary's five.
        from compiler_core.backends.torch.cuda.decode_attention import decode_attention as fast_decode
        from compiler_core.backends.torch.cuda.rope_cache import rope_cache_write as fast_rope_cache
        from compiler_core.backends.torch.cuda.rotary import rotary as fast_rotary

    def tables(ctx: ForwardContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*rope_key, dtype)
        if key not in ctx.memo:
            ctx.memo[key] = rotary_tables(ctx.positions, frequencies, divisor, dtype)
        return ctx.memo[key]

    def attention(ctx: ForwardContext, qkv: torch.Tensor) -> torch.Tensor:
        b, s, _ = qkv.shape
        if fast_decode is not None and s == 1 and ctx.cache is not None and ctx.start_index is not None:
            cache = ctx.cache.slots[slot]
            cos, sin = tables(ctx, qkv.dtype) if kind == "rope" else (None, None)
            q = fast_rope_cache(qkv, cos, sin, cache.k, cache.v, ctx.start_index, nh, nkv, hd, cache.scale)
            out = fast_decode(q, cache.k, cache.v, ctx.attention_mask, scale, cache.scale, ctx.start_index)
            return out.view(b, 1, nh * hd)  # decode_attention's output is contiguous: a view, no copy
        if kind == "rope":
            cos, sin = tables(ctx, qkv.dtype)
            # Q and K heads are adjacent in the fused projection: rotate them in one pass.
            heads = qkv[..., : (nh + nkv) * hd].view(b, s, nh + nkv, hd)
            if fast_rotary is not None:
                qk = fast_rotary(heads, cos, sin)
            else:
                qk = apply_rotary(heads.transpose(1, 2), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
        else:
            q = qkv[..., : nh * hd].view(b, s, nh, hd).transpose(1, 2)
            k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, s, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(b, s, nkv, hd).transpose(1, 2)
        # New sequences attend to their own tokens only (as the cache gives them back): causal
        # attention without a mask, which SDPA runs as flash attention on CUDA, instead of a masked
        # pass over the cache (on an H200, 8.8 of the 30.5 ms of GPU time of a 1024-token
        # falcon-7b prompt pass, which ran the memory-efficient kernel with a mask).
        own = ctx.new_sequences and alibi is None
        if ctx.cache is not None and ctx.start_index is not None:
            cache = ctx.cache.slots[slot]
            if ctx.row_index is None:
                cache.write_at(k, v, ctx.columns(s))
                if not own:
                    k, v = cache.read_all(q.dtype)
            else:  # a static prompt chunk of some rows: through a copy of theirs, put back after
                rows = cache.gather_rows(ctx.row_index)
                rows.write_at(k, v, ctx.columns(s))
                cache.scatter_rows(ctx.row_index, rows)
                if not own:
                    k, v = rows.read_all(q.dtype)
        elif ctx.cache is not None:
            cache = ctx.cache.slots[slot]
            cache.write(k, v, ctx.start)
            if not own:
                k, v = cache.read(ctx.start + s, q.dtype)
        if own:
            if ctx.cache is not None:
                stored = ctx.cache.slots[slot]
                k, v = stored.as_stored(k, q.dtype), stored.as_stored(v, q.dtype)
            mask = None  # causal among the new tokens, which is all they attend
        else:
            mask_key = ("mask", alibi_key, q.dtype, s)
            if mask_key not in ctx.memo:
                ctx.memo[mask_key] = attention_bias(ctx, s, q.dtype, alibi)
            mask = ctx.memo[mask_key]
        if groups > 1 and s == 1 and mask is not None:
            # Decode with shared KV heads: a KV head's `groups` query heads become its query rows,
            # so the cache is read as stored instead of being copied `groups` times per layer.
            q = q.reshape(b, nkv, groups, hd)
            if mask.shape[1] != 1:
                mask = mask.view(b, nkv, groups, mask.shape[-1])
            with sdpa_kernel(SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return out.reshape(b, 1, nh * hd)
        # Without a mask, flash attention takes shared KV heads as they are (enable_gqa); the masked
        # kernels need them repeated per query head.
        gqa = groups > 1 and mask is None
        if groups > 1 and not gqa:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
        return out.transpose(1, 2).reshape(b, s, nh * hd)

    return attention


CORE_KERNELS: dict[str, Callable[[Node, TorchLowering], Kernel]] = {
    "embedding": lower_embedding,
    "layer_norm": lower_layer_norm,
    "rms_norm": lower_rms_norm,
    "linear": lower_linear,
    "bias_add": lower_bias_add,
    "attention": lower_attention,
    "gelu": lower_gelu,
    "relu": lambda node, low: lambda ctx, x: F.relu(x),
    "silu": lambda node, low: lambda ctx, x: F.silu(x),
    "add": lower_add,
    "mul": lower_mul,
    "all_reduce": lower_all_reduce,
    "all_gather": lower_all_gather,
    "narrow": lower_narrow,
}
