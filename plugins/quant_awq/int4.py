"""Symmetric group-wise INT4 weights: quantize, pack two per byte, unpack, dequantize.

Layout (the checkpoint's and every backend's): a linear weight is ``[out, in]``. Each row is cut
into ``ceil(in / group_size)`` groups of consecutive input channels: every group holds
``group_size`` channels except, when ``group_size`` does not divide ``in``, the last one, which
holds the remaining ``in % group_size`` (a *ragged* last group, as ONNX's blocked
DequantizeLinear allows; falcon-7b's hidden size 4544 is 35 groups of 128 and one of 64).
Group ``g`` of row ``o`` has one scale ``scales[o, g] = amax / 7`` over the channels it holds
(TensorRT and ModelOpt INT4 are symmetric: no zero point), and
``q = clamp(round_half_even(w / scale), -8, 7)``.

Packing is along the input dim (dim 1), as :mod:`compiler_core.formats.int4` stores int4 for the
core ``dequantize`` primitive (:func:`pack_int4` / :func:`unpack_int4` come from there). Packing
along ``in`` keeps every output row intact, so row-wise transforms (column-parallel splits,
Falcon's fused-QKV reorder) apply to the packed weight and its scales exactly as to a plain
weight. It needs an even ``in``.

Internally, a ragged row is zero-padded to whole groups before it is reshaped into groups: a zero
changes no group's max |w| and quantizes to code 0, and the padding is cut off again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Re-exported: the AWQ code and its tests use the core's int4 storage through this module.
from compiler_core.formats.int4 import num_groups as num_groups
from compiler_core.formats.int4 import pack_int4 as pack_int4
from compiler_core.formats.int4 import scale_groups_ as scale_groups_
from compiler_core.formats.int4 import unpack_int4 as unpack_int4

INT4_MIN, INT4_MAX = -8, 7


def check_group_size(group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is a positive even number."""
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, in]`` -> ``[rows, groups, group_size]``, a ragged last group zero-padded.

    A view when ``group_size`` divides ``in``; otherwise a padded copy.
    """
    rows, inp = t.shape
    pad = num_groups(inp, group_size) * group_size - inp
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(rows, -1, group_size)


def ungrouped(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: ``[rows, groups, group_size]`` -> ``[rows, in_features]``, padding cut off."""
    return t.reshape(t.shape[0], -1)[:, :in_features].contiguous()


def group_amax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group max |w|: ``[out, in]`` -> ``[out, ceil(in / group_size)]`` (float32)."""
    check_group_size(group_size)
    return grouped(w.float().abs(), group_size).amax(-1)


def scales_from_amax(amax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``amax / 7`` rounded to ``dtype``, kept at or above the smallest normal of ``dtype``.

    The scale is rounded to the storage dtype *before* the weight is divided by it, so that
    dequantization with the stored scale reproduces exactly the values the search scored. The
    floor keeps an all-zero (or underflowing) group finite: its codes are then 0.
    """
    return (amax.float() / INT4_MAX).clamp(min=torch.finfo(dtype).tiny).to(dtype)


def _grouped_codes(w: torch.Tensor, group_size: int, amax: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    """float32 codes ``[out, groups, group_size]`` of ``w`` for per-group ``scales`` (float32).

    Works on the grouped view with broadcast scales: no full-size copies of the scales. Padding
    of a ragged last group gets code 0.
    """
    wg = grouped(w.float(), group_size)
    if amax is not None:
        # Clip to the (possibly shrunk) range first, as llm-awq does.
        a = amax.float()[..., None]
        wg = torch.maximum(torch.minimum(wg, a), -a)
    # torch.round rounds half to even, as TensorRT's quantization does.
    return (wg / scales[..., None]).round_().clamp_(INT4_MIN, INT4_MAX)


def quantize_groups(
    w: torch.Tensor, group_size: int, amax: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` to int4 codes (int8 ``[out, in]``) and scales ``[out, ceil(in / group_size)]``.

    ``amax`` (per group, default: the group's max |w|) is the clipping range: weights beyond it
    saturate, which is how AWQ's clip search shrinks a group's range.
    """
    check_group_size(group_size)
    scales = scales_from_amax(group_amax(w, group_size) if amax is None else amax, scale_dtype)
    q = _grouped_codes(w, group_size, amax, scales.float())
    return ungrouped(q.to(torch.int8), w.shape[1]), scales


def dequantize_codes(
    q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """int4 codes ``[out, in]`` times their group scales -> ``[out, in]`` in ``dtype`` (computed in float32)."""
    # A copy even for float input: the scaling is in place.
    return scale_groups_(q.to(torch.float32, copy=True), scales.float(), group_size).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize with float32 scales, the error model every search scores.

    Equal to ``dequantize_codes(*quantize_groups(w, group_size, amax), group_size)`` without the
    int8 round trip.
    """
    check_group_size(group_size)
    scales = scales_from_amax(group_amax(w, group_size) if amax is None else amax)
    return ungrouped(_grouped_codes(w, group_size, amax, scales).mul_(scales[..., None]), w.shape[1])


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed int4 weight and group scales -> the dense ``[out, in]`` weight in ``dtype``."""
    return dequantize_codes(unpack_int4(packed), scales, group_size, dtype)
