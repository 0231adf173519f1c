"""Torch kernels of the quantization primitives ``quantize``, ``dequantize``, ``matmul``, ``channel_scale``.

These are the reference semantics (see :mod:`compiler_core.ir.ops` for how scales are read):
quantized ops that decompose into them run on torch through these kernels, and the fused
patterns of :mod:`compiler_core.backends.torch.fused` must agree with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from compiler_core.backends.torch.kernels import Kernel, TorchLowering, torch_dtype
from compiler_core.formats.int4 import unpack_int4
from compiler_core.ir import Node

#: Saturation range of each code type ``quantize`` produces.
CODE_RANGES: dict[str, tuple[float, float]] = {
    "float8_e4m3fn": (-448.0, 448.0),
    "int8": (-128.0, 127.0),
    "int4": (-8.0, 7.0),
}


def is_blocked(attrs: Mapping[str, Any]) -> bool:
    """True when a quantize/dequantize node's scale is blocked (``axis`` and ``block_size``)."""
    return attrs.get("block_size") is not None


def broadcast_scale(
    scale: torch.Tensor, shape: torch.Size, attrs: Mapping[str, Any], dtype: torch.dtype
) -> torch.Tensor:
    """``scale`` shaped to multiply data of ``shape``: float32 per tensor or per channel, ``dtype`` when blocked."""
    axis = attrs.get("axis")
    if axis is None:
        return scale.float().reshape(())
    axis = int(axis) % len(shape)
    if not is_blocked(attrs):
        return scale.float().reshape([-1 if d == axis else 1 for d in range(len(shape))])
    block = int(attrs["block_size"])
    return scale.to(dtype).repeat_interleave(block, dim=axis).narrow(axis, 0, shape[axis])


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, attrs: Mapping[str, Any]) -> torch.Tensor:
    """``x / scale`` in float32, saturated and rounded to nearest even into the codes of ``attrs["dtype"]``.

    int4 codes are returned one per int8 element (packing is a storage matter).
    """
    dtype = attrs["dtype"]
    lo, hi = CODE_RANGES[dtype]
    scaled = (x.float() / broadcast_scale(scale, x.shape, attrs, torch.float32)).clamp(lo, hi)
    if dtype == "float8_e4m3fn":
        return scaled.to(torch.float8_e4m3fn)  # the cast rounds to nearest even
    return scaled.round().to(torch.int8)  # torch.round rounds half to even


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, attrs: Mapping[str, Any], out_dtype: torch.dtype
) -> torch.Tensor:
    """``codes * scale`` as ``out_dtype``: in float32 for per-tensor and per-channel scales, in
    ``out_dtype`` for blocked ones (a code times a scale rounds once either way)."""
    if is_blocked(attrs):
        return codes.to(out_dtype) * broadcast_scale(scale, codes.shape, attrs, out_dtype)
    return (codes.float() * broadcast_scale(scale, codes.shape, attrs, torch.float32)).to(out_dtype)


def out_dtype_of(node: Node, low: TorchLowering) -> torch.dtype:
    """The dtype a ``dequantize`` node produces: its ``out_dtype`` attribute, else the compute dtype."""
    name = node.attrs.get("out_dtype")
    return low.compute_dtype if name is None else torch_dtype(name)


def stored_codes(node: Node, low: TorchLowering) -> torch.Tensor:
    """The codes of a ``dequantize`` node's ``quantized`` parameter, int4 unpacked to one per element."""
    stored = low.param(node, "quantized")
    return unpack_int4(stored) if node.attrs["dtype"] == "int4" else stored


def lower_quantize(node: Node, low: TorchLowering) -> Kernel:
    scale, attrs = low.param(node, "scale"), dict(node.attrs)
    return lambda ctx, x: quantize_codes(x, scale, attrs)


def lower_dequantize(node: Node, low: TorchLowering) -> Kernel:
    scale, attrs, out = low.param(node, "scale"), dict(node.attrs), out_dtype_of(node, low)
    if node.inputs:
        return lambda ctx, codes: dequantize_codes(codes, scale, attrs, out)
    # A weight dequantized on every call: the torch backend's fused patterns fold it once instead.
    codes = stored_codes(node, low)
    return lambda ctx: dequantize_codes(codes, scale, attrs, out)


def lower_matmul(node: Node, low: TorchLowering) -> Kernel:
    bias = low.param(node, "bias")
    return lambda ctx, x, weight: F.linear(x, weight, bias)


def lower_channel_scale(node: Node, low: TorchLowering) -> Kernel:
    scale = low.param(node, "scale")
    return lambda ctx, x: x * scale


QUANT_KERNELS = {
    "quantize": lower_quantize,
    "dequantize": lower_dequantize,
    "matmul": lower_matmul,
    "channel_scale": lower_channel_scale,
}
