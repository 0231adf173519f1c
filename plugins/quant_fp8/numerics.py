"""FP8 E4M3 arithmetic: per-tensor scales, quantize (saturating, round to nearest even), dequantize.

E4M3 (``float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits; finite range ±448,
subnormals down to 2^-9, NaN but no infinity. A tensor ``x`` with per-tensor scale ``s`` is
stored as ``q = sat(x / s)`` and read back as ``q * s`` (TensorRT-LLM's and ONNX QuantizeLinear's
convention), with ``s = amax / 448`` so the largest calibrated magnitude maps onto the largest
finite code.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite E4M3 magnitude.
E4M3_MAX = 448.0


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """The per-tensor scale ``amax / 448`` as a float32 tensor of shape [1].

    An amax of 0 (an all-zero tensor) gives scale 1: any scale represents zeros exactly, and
    it keeps ``x / scale`` finite.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"amax {amax.item()} is not finite")
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in float32, saturated to ±448, rounded to nearest even into float8_e4m3fn."""
    return (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` computed in float32, returned as ``dtype``."""
    return (q.float() * scale.float()).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize, back in ``x``'s dtype: the value an FP8 round trip leaves."""
    return dequantize(quantize(x, scale), scale, x.dtype)
