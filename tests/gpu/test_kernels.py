"""The Triton kernels against float64 references (the fused rotary + KV-cache write and the fused
residual add against the torch ops they replace, bit for bit), over awkward shapes.

On a CUDA GPU they run there; elsewhere under Triton's interpreter on CPU tensors (see
conftest.py), with shapes kept small because the interpreter is slow. Each case draws fresh
random inputs; a NaN or an unwritten output fails the relative-error check.

Tolerances: bfloat16 outputs are rounded once from float32 accumulators (relative error of a
row ~2^-9), so bfloat16 cases allow 1e-2; float32 activations leave only float32 accumulation,
so they allow 1e-5, except the FP8 GEMM: Hopper's FP8 tensor-core products of 64+ row tiles
accumulate with fewer bits than float32 (measured up to 1.1e-4 on an H200), so 3e-4 there.
"""

from __future__ import annotations

import pytest
import torch

from modelc_plugins.quant_awq.int4 import dequantize_packed, pack_int4, quantize_groups
from modelc_plugins.quant_fp8 import numerics

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
import triton.language as tl  # noqa: E402

from compiler_core.backends.torch.cuda.decode_attention import decode_attention  # noqa: E402
from compiler_core.backends.torch.cuda.epilogue import Epilogue  # noqa: E402
from compiler_core.backends.torch.cuda.fp8_gemm import fp8_linear, round_to_e4m3  # noqa: E402
from compiler_core.backends.torch.cuda.int4_gemm import (  # noqa: E402
    dequantize_int4,
    int4_linear,
    prepare_int4_weight,
)
from compiler_core.backends.torch.cuda.residual_add import residual_add  # noqa: E402
from compiler_core.backends.torch.cuda.rope_cache import rope_cache_write  # noqa: E402
from compiler_core.backends.torch.cuda.splitk import TileLocks  # noqa: E402
from compiler_core.backends.torch.cuda.tiling import Config  # noqa: E402
from compiler_core.backends.torch.fused.int4 import dequantize_in_dtype  # noqa: E402
from compiler_core.backends.torch.kernels import apply_rotary, rotary_tables  # noqa: E402
from compiler_core.runtime.context import CacheSlot  # noqa: E402

CUDA = torch.cuda.is_available()
BF16_TOL, FP32_TOL = 1e-2, 1e-5
FP8_FP32_TOL = 3e-4
ATTENTION_BF16_TOL = 2e-2
#: (M, N, K, group): M across the tilings (<= 16, <= 64, > 64), N not a multiple of the 64 or 128
#: column tile, K with a ragged last group (falcon-7b's 4544 = 35 x 128 + 64, scaled down).
INT4_SHAPES = [(1, 40, 96, 32), (3, 72, 160, 64), (16, 24, 64, 32), (17, 130, 96, 32), (64, 8, 48, 32)]
INT4_LARGE = [(65, 136, 96, 32), (130, 72, 160, 64)]
FP8_SHAPES = [(1, 40, 200), (5, 72, 130), (16, 24, 64), (33, 130, 128), (64, 8, 300)]
FP8_LARGE = [(65, 136, 96), (130, 72, 260)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def large(shapes):
    """M > 64 cases: on the GPU always; under the interpreter marked slow (128-row tiles)."""
    return [pytest.param(*s, marks=[] if CUDA else [pytest.mark.slow]) for s in shapes]


@pytest.mark.parametrize(("m", "n", "k", "group"), INT4_SHAPES + large(INT4_LARGE))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_linear(device, m, n, k, group, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    codes, scales = quantize_groups(torch.randn(n, k, generator=gen), group, scale_dtype=torch.bfloat16)
    packed = pack_int4(codes)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    weight = prepare_int4_weight(packed.to(device), scales.to(device), group)
    got = int4_linear(x.to(device), weight, bias.to(device)).cpu()
    want = x.double() @ dequantize_packed(packed, scales, group, torch.float64).T + bias.double()
    assert got.shape == (m, n) and got.dtype == dtype
    assert relative_error(got, want) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


def test_int4_ragged_padding_is_zero_weight(device):
    """Garbage-free padding: a ragged layer's padded inputs meet weight 0, whatever the last group's scale."""
    n, k, group = 24, 80, 32  # 2 whole groups + one of 16
    codes, scales = quantize_groups(torch.randn(n, k), group)
    scales[:, -1] = 1e4  # a huge last-group scale would amplify any nonzero padded code
    packed = pack_int4(codes)
    weight = prepare_int4_weight(packed.to(device), scales.to(device), group)
    assert weight.padded_in == 128  # 3 groups of 32, padded to a layout block of 128 codes
    x = torch.randn(2, k)
    got = int4_linear(x.to(device), weight).cpu()
    want = x.double() @ dequantize_packed(packed, scales, group, torch.float64).T
    assert relative_error(got, want) < FP32_TOL


#: (config, group): both INT4 GEMM forms (block_k 0: one group per tile, rescaled in float32; else
#: codes scaled in registers) with K tiles of several groups, exactly one and part of one, explicit
#: and automatic split-K, row tiles smaller than M, in both operand orders.
INT4_CONFIGS = [
    (Config(16, 32, 0, 2, 4, 2), 32),
    (Config(16, 32, 128, 0, 4, 2), 32),
    (Config(32, 16, 64, 3, 4, 2), 64),
    (Config(16, 32, 32, 1, 4, 2), 128),
    (Config(64, 32, 256, 1, 4, 2), 128),
    (Config(16, 32, 0, 2, 4, 2, swap_ab=True), 32),
    (Config(32, 16, 64, 3, 4, 2, swap_ab=True), 64),
    (Config(16, 64, 32, 1, 4, 2, swap_ab=True), 128),
]
#: M from 1 to 70 (across 16-, 32- and 64-row tiles and past them).
INT4_ROWS = (1, 2, 3, 7, 16, 17, 31, 33, 64, 70)


@pytest.mark.parametrize(("config", "group"), INT4_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_configs(device, config, group, dtype):
    """Every launch form against float64, with N off the column tile and a ragged last group."""
    n, k = 40, 3 * group + group // 2  # 40: not a multiple of 16 or 32 columns; K: 3.5 groups
    gen = torch.Generator().manual_seed(group + config.block_k)
    codes, scales = quantize_groups(torch.randn(n, k, generator=gen), group, scale_dtype=torch.bfloat16)
    packed = pack_int4(codes)
    weight = prepare_int4_weight(packed.to(device), scales.to(dtype).to(device), group)
    bias = torch.randn(n, generator=gen).to(dtype)
    w = dequantize_packed(packed, scales, group, torch.float64)
    for m in INT4_ROWS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        got = int4_linear(x.to(device), weight, bias.to(device), config).cpu()
        want = x.double() @ w.T + bias.double()
        assert got.shape == (m, n) and got.dtype == dtype
        assert relative_error(got, want) < (BF16_TOL if dtype == torch.bfloat16 else FP32_TOL), (m, config)


@pytest.mark.parametrize(("config", "group"), INT4_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_linear_of_the_identity_is_the_dequantized_weight(device, config, group, dtype):
    """Bit for bit: with one nonzero product per output, the GEMM returns each weight exactly as
    dequantize_in_dtype rounds it, so every code, scale and rounding in registers is checked."""
    n, k = 40, 3 * group + group // 2
    gen = torch.Generator().manual_seed(7 * group + config.block_n)
    codes, scales = quantize_groups(torch.randn(n, k, generator=gen), group, scale_dtype=dtype)
    packed = pack_int4(codes)
    weight = prepare_int4_weight(packed.to(device), scales.to(device), group)
    eye = torch.eye(k, dtype=dtype)
    got = int4_linear(eye.to(device), weight, None, config).cpu()
    assert torch.equal(got, dequantize_in_dtype(packed, scales, group, dtype).T)


def test_int4_linear_rejects_unusable_k_tiles(device):
    weight = prepare_int4_weight(torch.zeros(8, 32, dtype=torch.int8, device=device), torch.ones(8, 1), 64)
    with pytest.raises(ValueError, match="block_k 48"):
        int4_linear(torch.zeros(1, 64, device=device), weight, None, Config(16, 16, 48, 1, 4, 2))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_int4_is_bit_exact(device, group, dtype):
    """The prefill path's dense weight is dequantize_in_dtype's, bit for bit (ragged last group too)."""
    n, k = 37, 2 * group + group // 2
    gen = torch.Generator().manual_seed(group)
    # Scales of wide range, so that code * scale rounds (ties included) in bfloat16 / float16.
    scales = (torch.rand(n, 3, generator=gen) * 4 + 0.01).to(dtype)
    packed = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8)
    got = dequantize_int4(prepare_int4_weight(packed.to(device), scales.to(device), group), dtype).cpu()
    assert torch.equal(got, dequantize_in_dtype(packed, scales, group, dtype))


@pytest.mark.parametrize("kernel", ["int4", "fp8"])
def test_split_k_counters_return_to_zero_and_calls_repeat(device, kernel):
    """The last split of each tile adds the partials and resets its counter: calls that share one
    TileLocks (as a layer's do, CUDA-graph replays included) keep giving the float64 result, and
    leave every counter at zero."""
    gen = torch.Generator().manual_seed(5)
    n, k, group = 72, 320, 32
    if kernel == "int4":
        codes, scales = quantize_groups(torch.randn(n, k, generator=gen), group, scale_dtype=torch.bfloat16)
        packed = pack_int4(codes)
        weight = prepare_int4_weight(packed.to(device), scales.to(device), group)
        w = dequantize_packed(packed, scales, group, torch.float64)
        config = Config(16, 32, 32, 5, 4, 2)  # 10 K tiles in 5 splits; 3 column tiles

        def call(x, locks):
            return int4_linear(x.to(device), weight, None, config, locks)

        def reference(x):
            return x.double() @ w.T
    else:
        _, wq, w_scale, x_scale, _ = fp8_case(1, n, k, torch.float32, gen)
        config = Config(16, 32, 32, 5, 4, 2)

        def call(x, locks):
            return fp8_linear(*(t.to(device) for t in (x, wq, w_scale, x_scale)), None, config, locks)

        def reference(x):
            return numerics.quantize(x, x_scale).double() @ wq.double().T * (x_scale.double() * w_scale.double())

    locks = TileLocks(device, tiles=4)  # fewer than a 2-row-block call needs: it grows
    for m in (1, 3, 20, 1):
        x = torch.randn(m, k, generator=gen)
        got = call(x, locks).cpu()
        assert relative_error(got, reference(x)) < FP8_FP32_TOL, m
        assert not locks.counters.any()
    assert locks.counters.numel() >= 6  # 3 column tiles x 2 row tiles at 20 rows


def fp8_case(m: int, n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen) * 0.05
    w_scale = numerics.scale_from_amax(w.abs().max())
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    # An activation scale that saturates the largest inputs, as a static calibrated scale can.
    x_scale = numerics.scale_from_amax(float(x.float().abs().max()) * 0.8)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, numerics.quantize(w, w_scale), w_scale, x_scale, bias


@pytest.mark.parametrize(("m", "n", "k"), FP8_SHAPES + large(FP8_LARGE))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear(device, m, n, k, dtype):
    """The fused quantization rounds exactly as numerics.quantize (saturating, ties to even)."""
    x, wq, w_scale, x_scale, bias = fp8_case(m, n, k, dtype, torch.Generator().manual_seed(m * 1000 + n + k))
    got = fp8_linear(*(t.to(device) for t in (x, wq, w_scale, x_scale, bias))).cpu()
    want = numerics.quantize(x, x_scale).double() @ wq.double().T * (x_scale.double() * w_scale.double())
    want = want + bias.double()
    assert got.shape == (m, n) and got.dtype == dtype
    assert relative_error(got, want) < (BF16_TOL if dtype == torch.bfloat16 else FP8_FP32_TOL)


#: FP8 launches in both operand orders, with split-K (explicit, automatic, none) and row tiles below M.
FP8_CONFIGS = [
    Config(16, 32, 64, 3, 4, 2),
    Config(16, 32, 64, 3, 4, 2, swap_ab=True),
    Config(32, 64, 32, 0, 4, 2, swap_ab=True),
    Config(16, 16, 128, 1, 4, 2, swap_ab=True),
]


@pytest.mark.parametrize("config", FP8_CONFIGS)
def test_fp8_linear_configs(device, config):
    """Every launch form against float64 at M across the row tiles, N off the column tile."""
    gen = torch.Generator().manual_seed(config.block_k + config.split_k)
    for m in (1, 2, 17, 33):
        x, wq, w_scale, x_scale, bias = fp8_case(m, 40, 200, torch.float32, gen)
        got = fp8_linear(*(t.to(device) for t in (x, wq, w_scale, x_scale, bias)), config).cpu()
        want = numerics.quantize(x, x_scale).double() @ wq.double().T * (x_scale.double() * w_scale.double())
        assert relative_error(got, want + bias.double()) < FP8_FP32_TOL, (m, config)


#: GEMM epilogues: each GELU form, with and without a column scale, and a column scale alone.
EPILOGUES = [("none", True), ("tanh", False), ("none", False), ("", True)]
#: One launch with split-K (the last split applies the epilogue to the sum) and one without.
EPILOGUE_CONFIGS = {
    "int4": [Config(16, 32, 0, 3, 4, 2, swap_ab=True), Config(16, 64, 64, 1, 4, 2)],
    "fp8": [Config(16, 32, 64, 3, 4, 2, swap_ab=True), Config(16, 64, 64, 1, 4, 2)],
}


@pytest.mark.parametrize(("activation", "scaled"), EPILOGUES)
@pytest.mark.parametrize("kernel", ["int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemm_epilogue_is_the_gelu_and_column_scale_of_the_output(device, kernel, activation, scaled, dtype):
    """``column_scale * gelu(x @ W.T + bias)`` in the GEMM's store, against float64, for every form."""
    n, k, group = 40, 176, 32  # 40 columns: off the column tiles; 176 = 5.5 groups
    gen = torch.Generator().manual_seed(len(activation) + 2 * scaled)
    column_scale = (torch.rand(n, generator=gen) + 0.5).to(dtype) if scaled else None
    epilogue = Epilogue(activation, None if column_scale is None else column_scale.to(device))
    if kernel == "int4":
        codes, scales = quantize_groups(torch.randn(n, k, generator=gen), group, scale_dtype=torch.bfloat16)
        weight = prepare_int4_weight(pack_int4(codes).to(device), scales.to(dtype).to(device), group)
        w = dequantize_packed(pack_int4(codes), scales, group, torch.float64)
        bias = torch.randn(n, generator=gen).to(dtype)
    for config in EPILOGUE_CONFIGS[kernel]:
        for m in (1, 17):
            if kernel == "int4":
                x = torch.randn(m, k, generator=gen).to(dtype)
                got = int4_linear(x.to(device), weight, bias.to(device), config, epilogue=epilogue).cpu()
                want = x.double() @ w.T + bias.double()
                tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
            else:
                x, wq, w_scale, x_scale, bias = fp8_case(m, n, k, dtype, gen)
                operands = (t.to(device) for t in (x, wq, w_scale, x_scale, bias))
                got = fp8_linear(*operands, config, epilogue=epilogue).cpu()
                want = numerics.quantize(x, x_scale).double() @ wq.double().T * (x_scale.double() * w_scale.double())
                want = want + bias.double()
                tol = BF16_TOL if dtype == torch.bfloat16 else FP8_FP32_TOL
            if activation:
                want = torch.nn.functional.gelu(want, approximate=activation)
            if column_scale is not None:
                want = want * column_scale.double()
            assert got.shape == (m, n) and got.dtype == dtype
            assert relative_error(got, want) < tol, (m, config)


@triton.jit
def _rounded(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + r, round_to_e4m3(tl.load(x_ptr + r, mask=r < n)), mask=r < n)


def test_e4m3_rounding_matches_torch(device):
    """Every tie, exponent carry and subnormal: the kernel's rounding is torch's float8 cast."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].unique()
    # Each code, each midpoint to the next code (ties) and points just either side of it.
    mids = (codes[1:] + codes[:-1]) / 2
    x = torch.cat(
        [
            codes,
            mids,
            mids.nextafter(torch.full_like(mids, 1e9)),
            mids.nextafter(-torch.full_like(mids, 1e9)),
            torch.tensor([-0.0, -1e-4, -0.0009, 1e-4]),  # round to -0 (sign kept) and +0
        ]
    )
    x = x.clamp(-448, 448).contiguous()
    y = torch.full_like(x, float("nan"), device=device)
    block = 1024
    _rounded[(triton.cdiv(x.numel(), block),)](x.to(device), y, x.numel(), BLOCK=block)
    # Bit patterns, not values: -0.0 (what tiny negatives round to) must stay -0.0.
    assert torch.equal(y.cpu().view(torch.int32), x.to(torch.float8_e4m3fn).float().view(torch.int32))


def attention_reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    s = torch.einsum("bhd,bhld->bhl", q.double(), k) * scale
    s = s.masked_fill(mask[:, None] == 0, float("-inf"))
    return torch.einsum("bhl,bhld->bhd", s.softmax(-1), v)


#: (batch, heads, kv heads, head_dim, cache length): MQA with many query heads (falcon-7b: 71 on
#: one), GQA, a head_dim not a power of two, cache lengths off the 64-slot block.
ATTENTION_SHAPES = [(1, 71, 1, 64, 128), (2, 6, 2, 24, 130), (3, 8, 8, 16, 64), (1, 16, 4, 32, 500)]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "head_dim", "length"), ATTENTION_SHAPES)
@pytest.mark.parametrize("cache", ["bfloat16", "float32", "float8_e4m3fn"])
def test_decode_attention(device, batch, heads, kv_heads, head_dim, length, cache):
    gen = torch.Generator().manual_seed(batch * heads + length)
    dtype = torch.float32 if cache == "float32" else torch.bfloat16
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=gen) for _ in range(2))
    kv_scale = None
    if cache == "float8_e4m3fn":
        kv_scale = torch.tensor(3.0 / 448)
        k, v = (numerics.quantize(t, kv_scale) for t in (k, v))
        k_read, v_read = (numerics.dequantize(t, kv_scale, dtype) for t in (k, v))  # the cache's own read
    else:
        k, v = k.to(dtype), v.to(dtype)
        k_read, v_read = k, v
    # Rows attend to different spans: a left-padded prompt, a hole, a short row.
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[0, 3 : length - 5] = 1
    mask[-1, : min(40, length)] = 1
    if batch > 2:
        mask[1, ::3] = 1
    got = decode_attention(
        q.to(device),
        k.to(device),
        v.to(device),
        mask.to(device),
        0.125,
        None if kv_scale is None else kv_scale.to(device),
    ).cpu()
    want = attention_reference(q, k_read, v_read, mask, 0.125)
    assert got.shape == q.shape and got.dtype == dtype
    # Bounded at a column, the kernel reads nothing after it: mask and cache there hold values that
    # would change the output, and NaN keys, which would poison it, if they were read.
    last = length // 2 + 1
    open_mask, poisoned_k = mask.clone(), k.clone()
    open_mask[:, last + 1 :] = 1
    poisoned_k[:, :, last + 1 :] = float("nan")
    bounded = decode_attention(
        q.to(device),
        poisoned_k.to(device),
        v.to(device),
        open_mask.to(device),
        0.125,
        None if kv_scale is None else kv_scale.to(device),
        torch.tensor([last], device=device),
    ).cpu()
    cut = mask.clone()
    cut[:, last + 1 :] = 0
    want_bounded = attention_reference(q, k_read, v_read, cut, 0.125)
    assert relative_error(bounded, want_bounded) < (ATTENTION_BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)
    # bf16 rounds the softmax weights (relative 2^-9 each) before the V product, as SDPA does in
    # bf16; the output, an average of random values, is ~1/sqrt(length) of them, so that rounding
    # shows twice as large relative to it as in a GEMM. float32 checks the algorithm itself.
    assert relative_error(got, want) < (ATTENTION_BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)


#: (batch, tokens, heads of Q and K, head_dim, rotary dim): falcon-7b's 71 + 1 heads of 64, a
#: token count off the 16-token tile, partial rotary, a head_dim not a power of two, MHA at 128.
ROTARY_SHAPES = [(1, 37, 72, 64, 64), (3, 16, 6, 80, 80), (2, 5, 10, 64, 32), (1, 3, 8, 128, 128)]


@pytest.mark.parametrize(("batch", "seq", "heads", "head_dim", "rot_dim"), ROTARY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shared_positions", [True, False])
def test_rotary_is_bit_exact_with_the_torch_ops(device, batch, seq, heads, head_dim, rot_dim, dtype, shared_positions):
    """The prompt pass's rotary kernel gives apply_rotary's values bit for bit, reading the heads as a
    strided view of a fused projection (V heads after them, unread) with tables per row or shared."""
    from compiler_core.backends.torch.cuda.rotary import rotary

    gen = torch.Generator().manual_seed(batch * seq + heads)
    qkv = (torch.randn(batch, seq, (heads + 2) * head_dim, generator=gen) * 3).to(dtype).to(device)
    x = qkv[..., : heads * head_dim].view(batch, seq, heads, head_dim)
    positions = torch.randint(0, 2048, (1 if shared_positions else batch, seq), generator=gen).to(device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    cos, sin = rotary_tables(positions, inv_freq.to(device), None, dtype)
    got = rotary(x, cos, sin)
    want = apply_rotary(x.transpose(1, 2), cos, sin)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.cpu(), want.cpu())


#: (batch, heads, kv heads, head_dim, rotary dim, cache rows): falcon-7b's MQA (71 on one), GQA
#: with an odd head_dim (a masked 128-wide block), partial rotary, MHA at head_dim 128, caches
#: with more rows than the step has (the rows past the batch must stay untouched).
ROPE_CACHE_SHAPES = [(1, 71, 1, 64, 64, 1), (3, 8, 2, 80, 80, 4), (3, 8, 2, 64, 32, 3), (1, 4, 4, 128, 128, 2)]
#: (activation, cache): the activation dtype's own cache, a bfloat16 cache of a float32 engine
#: (the cast rounds), FP8 caches (divide, saturate, round to nearest even).
ROPE_CACHE_DTYPES = [
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float8_e4m3fn),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float8_e4m3fn),
]


def rope_cache_reference(qkv, cos, sin, slot, index, heads, kv_heads, head_dim):
    """The torch path ``lower_attention`` runs without the kernel: rotate, ``write_at``, Q's view."""
    b = qkv.shape[0]
    x = qkv[..., : (heads + kv_heads) * head_dim].view(b, 1, heads + kv_heads, head_dim).transpose(1, 2)
    if cos is not None:
        x = apply_rotary(x, cos, sin)
    q, k = x[:, :heads], x[:, heads:]
    v = qkv[..., (heads + kv_heads) * head_dim :].view(b, 1, kv_heads, head_dim).transpose(1, 2)
    slot.write_at(k, v, index)
    return q[:, :, 0]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers: an exact comparison that also tells NaNs and signed zeros apart."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "head_dim", "rot_dim", "rows"), ROPE_CACHE_SHAPES)
@pytest.mark.parametrize(("dtype", "cache_dtype"), ROPE_CACHE_DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
def test_rope_cache_write_is_the_torch_path(
    device, batch, heads, kv_heads, head_dim, rot_dim, rows, dtype, cache_dtype, rotary
):
    """Bit for bit what rotary + ``CacheSlot.write_at`` give (Q, and every byte of both caches),
    at the first, a middle and the last cache column, for the step's rows of a larger cache."""
    gen = torch.Generator().manual_seed(batch * 100 + heads + head_dim + rot_dim)
    width, length = (heads + 2 * kv_heads) * head_dim, 9
    # Outliers too (the FP8 scale below saturates them); the fused projection is a column slice of a
    # wider row, as a strided qkv would be.
    qkv = (torch.randn(batch, 1, width + 5, generator=gen) * torch.rand(width + 5, generator=gen) * 4).to(dtype)
    qkv = qkv.to(device)[..., :width]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    positions = torch.randint(0, 4000, (batch, 1), generator=gen).to(device)
    cos, sin = rotary_tables(positions, inv_freq, None, dtype) if rotary else (None, None)
    fp8 = cache_dtype == torch.float8_e4m3fn
    scale = None if not fp8 else torch.tensor(float(qkv.float().abs().max()) * 0.6 / 448, device=device)
    # Garbage, not zeros, in the caches: a write to a wrong column or row shows.
    k0, v0 = (torch.randn(rows, kv_heads, length, head_dim, generator=gen).to(cache_dtype) for _ in range(2))
    want = CacheSlot(k0.to(device), v0.to(device), scale)
    got = CacheSlot(want.k.clone(), want.v.clone(), scale)  # (.to of a CPU tensor to the CPU is no copy)
    for column in (0, 4, length - 1):
        index = torch.tensor([column], device=device)
        step = CacheSlot(want.k[:batch], want.v[:batch], scale)  # the torch path writes the step's rows
        q_want = rope_cache_reference(qkv, cos, sin, step, index, heads, kv_heads, head_dim)
        q = rope_cache_write(qkv, cos, sin, got.k, got.v, index, heads, kv_heads, head_dim, scale)
        assert q.shape == (batch, heads, head_dim) and q.dtype == dtype and q.is_contiguous()
        assert torch.equal(as_bytes(q), as_bytes(q_want))
        assert torch.equal(as_bytes(got.k), as_bytes(want.k))
        assert torch.equal(as_bytes(got.v), as_bytes(want.v))


@pytest.mark.parametrize("shape", [(1, 1, 4544), (3, 5, 96), (2, 1, 1030)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residual_add_is_two_torch_adds(device, shape, dtype):
    """``x + (a + b)`` with both of torch's roundings: a residual stream much larger than the two
    branch outputs, so that rounding the inner sum first (or not) changes the result."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 300).to(dtype).to(device)
    a, b = ((torch.randn(shape, generator=gen) * 0.7).to(dtype).to(device) for _ in range(2))
    got = residual_add(x, a, b)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(as_bytes(got), as_bytes(x + (a + b)))
