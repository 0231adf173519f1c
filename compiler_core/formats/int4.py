"""INT4 storage: two signed 4-bit codes per int8 byte along the last axis, the low nibble first.

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
