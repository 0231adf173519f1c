"""INT4 storage: two signed 4-bit codes per int8 byte along the last axis, the low nibble first,
and group scales ``[out, ceil(in / group_size)]`` (the last group ragged when it does not divide).

Byte ``[..., j]`` holds code ``[..., 2j]`` in its low nibble and ``[..., 2j + 1]`` in its high
nibble (TensorRT-LLM's ``q[:, 1::2] * 16 + (q[:, ::2] & 0xF)``), which is also ONNX's int4 byte
order for a row-major tensor. The ``dequantize`` primitive reads ``dtype="int4"`` weights this way.
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[..., n]`` (int8 in [-8, 7]) -> packed int8 ``[..., n / 2]``, low nibble = even index."""
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd input dim ({q.shape[-1]}) into int4 pairs")
    q = q.to(torch.int8)
    # hi << 4 keeps hi's sign in the top nibble; masking lo keeps its sign bits out of hi's nibble.
    return (q[..., 1::2] << 4) | (q[..., 0::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., n / 2]`` -> sign-extended codes int8 ``[..., n]``."""
    p = packed.to(torch.int8)
    lo = (p << 4) >> 4  # arithmetic shifts on int8 sign-extend the nibble
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row, ``ceil(in_features / group_size)`` (the last one ragged when it does not divide)."""
    return -(-in_features // group_size)


def scale_groups_(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Multiply ``w [out, in]`` (codes in a float dtype) in place by its group scales; return ``w``.

    Whole groups are scaled through a grouped view and a ragged last group on its own, so no
    padded copy of ``w`` or expanded copy of ``scales`` is made.
    """
    out, inp = w.shape
    if tuple(scales.shape) != (out, num_groups(inp, group_size)):
        raise ValueError(
            f"scales {list(scales.shape)} do not match a [{out}, {inp}] weight in groups of {group_size} "
            f"(expected [{out}, {num_groups(inp, group_size)}])"
        )
    whole = inp // group_size
    if whole:
        w[:, : whole * group_size].unflatten(1, (whole, group_size)).mul_(scales[:, :whole, None])
    if inp % group_size:
        w[:, whole * group_size :].mul_(scales[:, whole:])
    return w
