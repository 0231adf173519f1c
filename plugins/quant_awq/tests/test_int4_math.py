"""The INT4 math and the AWQ searches on plain tensors, against hand-written references."""

from __future__ import annotations

import pytest
import torch

from compiler_core.backends.torch.fused.int4 import dequantize_in_dtype, tinygemm_codes, tinygemm_matmul
from modelc_plugins.quant_awq.int4 import (
    check_group_size,
    dequantize_codes,
    dequantize_packed,
    fake_quantize,
    group_amax,
    pack_int4,
    quantize_groups,
    unpack_int4,
)
from modelc_plugins.quant_awq.search import _group_gram, candidate_scales, group_output_mse, search_clip, search_scale


def test_pack_nibble_order_matches_trtllm_and_onnx() -> None:
    q = torch.tensor([[1, -2, 7, -8], [-1, 0, 3, 5]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (2, 2) and packed.dtype == torch.int8
    as_bytes = packed.view(torch.uint8)
    # Low nibble = even input index, high nibble = odd one (two's complement nibbles).
    assert as_bytes[0, 0].item() == (0xE << 4) | 0x1  # q[0,0]=1 low, q[0,1]=-2 (0xE) high
    assert as_bytes[0, 1].item() == (0x8 << 4) | 0x7  # 7 low, -8 high
    assert as_bytes[1, 0].item() == (0x0 << 4) | 0xF  # -1 low, 0 high
    # TensorRT-LLM's formula on unsigned nibbles gives the same bytes.
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    assert torch.equal(as_bytes, u[:, 1::2] * 16 + u[:, ::2])


def test_pack_unpack_round_trip_every_code() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (33, 64), generator=g, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="odd input dim"):
        pack_int4(q[:, :3])


def _reference_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element, as the definition reads (the last group holds what is left of the row)."""
    out, inp = w.shape
    groups = (inp + group_size - 1) // group_size
    q = torch.zeros(out, inp, dtype=torch.int8)
    scales = torch.zeros(out, groups)
    for o in range(out):
        for g in range(groups):
            block = w[o, g * group_size : min(inp, (g + 1) * group_size)]
            s = max(float(block.abs().max()) / 7, torch.finfo(torch.float32).tiny)  # an all-zero group: codes 0
            scales[o, g] = s
            for j, v in enumerate(block.tolist()):
                r = round(v / s)  # Python's round is half to even
                q[o, g * group_size + j] = max(-8, min(7, r))
    return q, scales


def test_group_quantization_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 32, generator=g)
    w[2, 5] = 0.0
    # Exact halves: round half to even must give 2 and 4 (not 3 and 5) for 2.5 and 4.5 steps.
    w[3, :8] = torch.tensor([7.0, 2.5, 4.5, -2.5, 0.5, -0.5, 1.5, 0.0])
    q, scales = quantize_groups(w, 8)
    ref_q, ref_scales = _reference_quantize(w, 8)
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(scales, ref_scales)
    assert q[3, :8].tolist() == [7, 2, 4, -2, 0, 0, 2, 0]
    # Round trip error is at most half a step per element.
    err = (dequantize_codes(q, scales, 8) - w).abs()
    assert (err <= scales.repeat_interleave(8, 1) / 2 + 1e-6).all()
    packed = pack_int4(q)
    torch.testing.assert_close(dequantize_packed(packed, scales, 8, torch.float32), dequantize_codes(q, scales, 8))
    # The searches' fast quantize-dequantize is the same function, with and without clipping.
    assert torch.equal(fake_quantize(w, 8), dequantize_codes(q, scales, 8))
    clip = torch.rand(6, 4, generator=g) + 0.2
    assert torch.equal(fake_quantize(w, 8, clip), dequantize_codes(*quantize_groups(w, 8, clip), 8))


def test_ragged_last_group_round_trip() -> None:
    """40 inputs in groups of 16: two whole groups and a ragged one of 8, whose scale is the max |w|
    of those 8 alone (a large weight just before it must not leak in), through every function."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 40, generator=g)
    w[:, 31] = 50.0  # last channel of group 1
    w[1, 32:] = 0.0  # an all-zero ragged group
    q, scales = quantize_groups(w, 16)
    ref_q, ref_scales = _reference_quantize(w, 16)
    assert scales.shape == (5, 3) and q.shape == (5, 40)
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(scales, ref_scales)
    torch.testing.assert_close(scales[:, 2], w[:, 32:].abs().amax(1) / 7)
    assert (q[:, 32:].abs().amax(1)[[0, 2, 3, 4]] == 7).all() and (q[1, 32:] == 0).all()
    packed = pack_int4(q)
    assert packed.shape == (5, 20) and torch.equal(unpack_int4(packed), q)
    dense = dequantize_codes(q, scales, 16)
    step = scales.repeat_interleave(16, 1)[:, :40]
    assert ((dense - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(dequantize_packed(packed, scales, 16, torch.float32), dense)
    assert torch.equal(fake_quantize(w, 16), dense)
    clip = torch.rand(5, 3, generator=g) + 0.2
    assert torch.equal(fake_quantize(w, 16, clip), dequantize_codes(*quantize_groups(w, 16, clip), 16))
    for dtype in (torch.float16, torch.bfloat16):
        q16, s16 = quantize_groups(w, 16, scale_dtype=dtype)
        p16 = pack_int4(q16)
        assert torch.equal(dequantize_in_dtype(p16, s16, 16, dtype), dequantize_packed(p16, s16, 16, dtype))
    # A group larger than the row is one ragged group.
    q1, s1 = quantize_groups(w, 64)
    assert s1.shape == (5, 1) and torch.equal(dequantize_codes(q1, s1, 64), fake_quantize(w, 64))
    # Scales for another grouping of the same row are refused, not silently misapplied.
    with pytest.raises(ValueError, match="do not match"):
        dequantize_codes(q, scales, 8)


def test_searches_on_a_ragged_last_group() -> None:
    """The clip search's per-group losses cover exactly each group's channels, the short one too."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 40, generator=g)
    w = torch.randn(12, 40, generator=g) * 0.02
    w[:, 35] = 0.5  # an outlier weight in the ragged group
    wq = fake_quantize(w, 16)
    got = group_output_mse(w, wq, _group_gram(x, 16))
    bounds = [(0, 16), (16, 32), (32, 40)]
    want = torch.stack([(x[:, a:b] @ (w - wq)[:, a:b].T).pow(2).mean(0) for a, b in bounds], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)
    amax = search_clip(x, w, group_size=16)
    assert amax.shape == (12, 3)
    assert (amax <= group_amax(w, 16) + 1e-7).all()
    # Per group, the chosen range is never worse than no clipping, and the outlier's group is clipped.
    gram = _group_gram(x, 16)
    assert (group_output_mse(w, fake_quantize(w, 16, amax), gram) <= got * (1 + 1e-5)).all()
    assert (amax[:, 2] < group_amax(w, 16)[:, 2]).any()
    result = search_scale(x, [w], group_size=16)
    assert result.losses[0] == pytest.approx((x @ (wq - w).T).pow(2).mean().item(), rel=1e-4)


def test_int4_gemm_codes_pad_a_ragged_group_with_zero() -> None:
    """The CUDA kernel's codes (unsigned, even index in the high nibble) for 40 inputs in groups
    of 16 are padded to 48 with code 0: the padded inputs meet a zero weight."""
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-8, 8, (8, 40), generator=g, dtype=torch.int8)
    u = tinygemm_codes(pack_int4(q), 3, 16)
    assert u.shape == (8, 24) and u.dtype == torch.uint8
    decoded = torch.stack(((u >> 4).to(torch.int8), (u & 0xF).to(torch.int8)), dim=-1).reshape(8, 48) - 8
    assert torch.equal(decoded[:, :40], q) and (decoded[:, 40:] == 0).all()
    assert torch.equal(tinygemm_codes(pack_int4(q[:, :32]), 2, 16)[:, :16], u[:, :16])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_gemm_on_a_ragged_layer() -> None:
    """falcon-7b's 4544 inputs (35 groups of 128 + 64) through PyTorch's int4 GEMM: the kernel is
    used (no fallback warning) and matches the reference dequantization, for contiguous and
    strided activations."""
    import warnings

    g = torch.Generator().manual_seed(7)
    q, scales = quantize_groups(torch.randn(256, 4544, generator=g), 128, scale_dtype=torch.bfloat16)
    packed, scales = pack_int4(q).cuda(), scales.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matmul = tinygemm_matmul(packed, scales, 128, "ragged")
    assert matmul is not None
    weight = dequantize_packed(packed, scales, 128, torch.float32)
    for rows in (1, 5, 16):
        x = torch.randn(rows, 2 * 4544, device="cuda").to(torch.bfloat16)[:, ::2]  # strided
        want = x.float() @ weight.T
        got = matmul(x).float()
        assert got.shape == (rows, 256)
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_clip_range_saturates_and_scales_round_to_storage_dtype() -> None:
    w = torch.tensor([[1.0, -0.2, 0.1, 0.05]])
    q, scales = quantize_groups(w, 4, amax=torch.tensor([[0.35]]), scale_dtype=torch.float16)
    assert scales.dtype == torch.float16
    assert q[0, 0].item() == 7 and q[0, 1].item() == -4
    zero_q, zero_scales = quantize_groups(torch.zeros(1, 4), 4)
    assert torch.equal(zero_q, torch.zeros(1, 4, dtype=torch.int8)) and (zero_scales > 0).all()


def test_group_size_errors() -> None:
    check_group_size(128)
    for bad in (3, 0, -16):
        with pytest.raises(ValueError, match="positive even"):
            check_group_size(bad)
    with pytest.raises(ValueError, match=r"scales \[4, 2\] do not match a \[4, 40\] weight in groups of 16"):
        dequantize_codes(torch.zeros(4, 40), torch.ones(4, 2), 16)


def test_candidate_scales_are_normalised() -> None:
    x = torch.tensor([0.5, 2.0, 8.0])
    s = candidate_scales(x, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(candidate_scales(x, 0.0), torch.ones(3))


def _salient_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with a few large channels (the outliers AWQ protects) and a random weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 40.0
    w = torch.randn(96, 128, generator=g) * 0.05
    return x, w


def test_awq_scale_search_beats_round_to_nearest_on_salient_channels() -> None:
    x, w = _salient_layer()
    result = search_scale(x, [w], group_size=32)
    rtn_loss = result.losses[0]  # alpha = 0 is plain RTN
    assert len(result.losses) == 20
    assert result.alpha > 0
    # Protecting the salient channels must cut the output error substantially, not marginally.
    assert min(result.losses) < 0.7 * rtn_loss
    # The scaled layer, quantized, really has that loss.
    s = result.scales
    q, scales = quantize_groups(w * s, 32)
    out_q = (x / s) @ dequantize_codes(q, scales, 32).T
    loss = (out_q - x @ w.T).pow(2).mean().item()
    assert loss == pytest.approx(min(result.losses), rel=1e-3)


def test_clip_search_never_worse_and_helps_outlier_weights() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(32, 64, generator=g) * 0.02
    w[:, 7] = 0.5  # one large weight per group stretches the grid for the others
    amax = search_clip(x, w, group_size=16)
    assert amax.shape == (32, 4)

    def out_err(clip: torch.Tensor | None) -> float:
        q, s = quantize_groups(w, 16, clip)
        return (x @ (dequantize_codes(q, s, 16) - w).T).pow(2).mean().item()

    assert out_err(amax) <= out_err(None)
    assert (amax <= w.abs().reshape(32, 4, 16).amax(-1) + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_call_dequantization_equals_reference(dtype) -> None:
    """The CUDA kernel's dequantization (in the compute dtype) gives the float32 reference's weight."""
    g = torch.Generator().manual_seed(3)
    q, scales = quantize_groups(torch.randn(48, 64, generator=g), 16, scale_dtype=dtype)
    packed = pack_int4(q)
    assert torch.equal(dequantize_in_dtype(packed, scales, 16, dtype), dequantize_packed(packed, scales, 16, dtype))


def test_int4_gemm_falls_back_where_unavailable() -> None:
    """Off CUDA (or with a kernel that fails its probe) the int4 GEMM is not used, with a warning."""
    q, scales = quantize_groups(torch.randn(64, 256), 32, scale_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="layers.0.mlp.fc: int4 GEMM unavailable"):
        assert tinygemm_matmul(pack_int4(q), scales, 32, "layers.0.mlp.fc") is None
    assert tinygemm_matmul(pack_int4(q), scales.float(), 32, "fp32 model") is None
