"""FP8 E4M3 arithmetic against an independent numpy model of the format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler_core.runtime.context import CacheSlot
from modelc_plugins.quant_fp8 import numerics
from modelc_plugins.quant_fp8.testing import e4m3_table


def reference_quantize(x: np.ndarray) -> np.ndarray:
    """Codes (uint8) of float values: saturate to ±448, round to nearest, ties to the even code."""
    table = e4m3_table()
    positive = table[:127]  # codes 0..126: 0 ... 448, increasing
    assert np.all(np.diff(positive) > 0) and positive[-1] == 448.0
    mag = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    hi = np.clip(np.searchsorted(positive, mag, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = mag - positive[lo], positive[hi] - mag
    code = np.where(d_lo < d_hi, lo, hi)
    tie = d_lo == d_hi
    code = np.where(tie, np.where(lo % 2 == 0, lo, hi), code)
    code = np.where(mag == positive[hi], hi, code).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)
    return np.where(np.isnan(x), np.uint8(0x7F), code)


def codes_of(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy()


def test_every_code_decodes_like_the_bit_model():
    table = e4m3_table()
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(table))
    np.testing.assert_array_equal(decoded[~np.isnan(table)], table[~np.isnan(table)])
    assert np.nanmax(table) == numerics.E4M3_MAX == 448.0
    assert np.nanmin(np.abs(table[table != 0])) == 2.0**-9


def test_quantize_matches_the_bit_model_on_ties_neighbours_and_saturation():
    finite = e4m3_table()[:127]
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties: must go to the even code
    values = np.concatenate(
        [
            finite,
            mids,
            np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
            np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
            [448.0, 449.0, 463.99, 464.0, 465.0, 1e4, 3e38, 2.0**-10, 2.0**-11, 1e-30, 0.0],
            np.random.default_rng(0).standard_normal(20000) * 60,
        ]
    ).astype(np.float32)
    values = np.concatenate([values, -values, [np.nan]]).astype(np.float32)
    got = codes_of(numerics.quantize(torch.from_numpy(values), torch.tensor([1.0])))
    want = reference_quantize(values)
    nan = np.isnan(values)
    assert np.all(np.isnan(e4m3_table()[got[nan]]))
    bad = np.flatnonzero(got[~nan] != want[~nan])
    assert bad.size == 0, f"{values[~nan][bad[:5]]} -> {got[~nan][bad[:5]]}, want {want[~nan][bad[:5]]}"


def test_quantize_divides_by_the_scale_in_float32():
    x = torch.tensor([3.0, -7.5, 1000.0, 1e-4])
    scale = torch.tensor([0.0625])
    want = reference_quantize((x.numpy() / np.float32(0.0625)).astype(np.float32))
    np.testing.assert_array_equal(codes_of(numerics.quantize(x, scale)), want)
    back = numerics.dequantize(numerics.quantize(x, scale), scale)
    np.testing.assert_allclose(back.numpy(), e4m3_table()[want] * 0.0625)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_relative_error_is_at_most_half_an_ulp(dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    scale = numerics.scale_from_amax(x.float().abs().max())
    y = numerics.fake_quantize(x, scale)
    assert y.dtype == dtype
    normal = x.float().abs() / scale >= 2.0**-6  # outside the subnormal range: 3 mantissa bits
    rel = ((y.float() - x.float()).abs() / x.float().abs())[normal]
    assert rel.max() <= 2.0**-4 + 2.0**-8  # half an ulp, plus the compute dtype's own rounding
    assert (y.float().abs().max() - x.float().abs().max()).abs() <= 2.0**-7 * x.float().abs().max()


def test_scale_is_amax_over_448():
    x = torch.tensor([[0.5, -896.0], [12.0, 3.0]])
    scale = numerics.scale_from_amax(x.abs().max())
    assert scale.shape == (1,) and scale.dtype == torch.float32
    assert scale.item() == 2.0
    q = numerics.quantize(x, scale)
    assert q.float().abs().max().item() == 448.0  # the amax maps onto the largest finite code
    assert numerics.scale_from_amax(torch.tensor(44.8)).item() == pytest.approx(0.1)
    assert numerics.scale_from_amax(0.0).item() == 1.0  # all-zero tensor: any scale is exact
    with pytest.raises(ValueError, match="not finite"):
        numerics.scale_from_amax(float("inf"))


def test_core_kv_cache_slot_stores_the_same_codes():
    """The core's scaled FP8 cache (CacheSlot) must round and saturate exactly like the spec."""
    k = torch.randn(2, 3, 5, 8) * 4
    k[0, 0, 0, 0] = 1e5  # saturates
    v = torch.randn(2, 3, 5, 8)
    scale = torch.tensor(0.02)
    shape = (2, 3, 16, 8)
    slot = CacheSlot(
        torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.zeros(shape, dtype=torch.float8_e4m3fn), scale
    )
    slot.write(k, v, start=4)
    np.testing.assert_array_equal(codes_of(slot.k[:, :, 4:9]), codes_of(numerics.quantize(k, scale.reshape(1))))
    rk, rv = slot.read(9, torch.float32)
    torch.testing.assert_close(rv[:, :, 4:9], numerics.fake_quantize(v, scale.reshape(1)), rtol=0, atol=0)
    assert rk[0, 0, 4, 0].item() == pytest.approx(448 * 0.02)
