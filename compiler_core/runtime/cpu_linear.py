"""Linear layers on CPU through oneDNN's inner product for the few-row case (decode).

``F.linear`` on CPU goes to the BLAS (MKL in the official wheels), which streams a weight
matrix for a handful of rows at 15-20 GB/s on an AMD EPYC, well below what the memory
delivers. oneDNN's JIT inner product reads the same row-major weight, unchanged and without
a packed copy, 1.3-3x faster for up to ~128 rows, and slower for large row counts, where
BLAS's GEMM blocking wins (``bench/bench_decode.py`` shows the effect on a whole step).

``MODELC_ONEDNN_LINEAR=0`` turns this path off (everything then runs through ``F.linear``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Above this many rows (batch x positions) BLAS's GEMM is as fast or faster than oneDNN's
# inner product (measured for hidden 1024/4096 and a 65024-row vocabulary on 2 EPYC cores).
MAX_ONEDNN_ROWS = 128
# oneDNN spends ~30 us per call before it reads a byte (primitive lookup); below ~4 MiB of
# weights the BLAS call is done by then.
MIN_ONEDNN_WEIGHT_ELEMENTS = 1 << 20


@functools.cache
def onednn_linear_supported() -> bool:
    """Whether oneDNN's float32 inner product runs on this CPU and torch build (a tiny probe, once)."""
    if os.environ.get("MODELC_ONEDNN_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    linear_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear_pointwise is None:
        return False
    try:
        y = linear_pointwise(torch.ones(2, 8), torch.ones(4, 8), None, "none", [], "")
    except RuntimeError:
        return False
    return bool(torch.equal(y, torch.full((2, 4), 8.0)))


def cpu_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A few-row-fast linear for a CPU ``weight``, or None where ``F.linear`` is the right choice."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if weight.numel() < MIN_ONEDNN_WEIGHT_ELEMENTS:
        return None
    if bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()):
        return None
    if weight.dtype != torch.float32 or not onednn_linear_supported():
        return None
    linear_pointwise = torch.ops.mkldnn._linear_pointwise
    in_features = weight.shape[1]

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != weight.dtype or x.numel() > MAX_ONEDNN_ROWS * in_features or x.requires_grad:
            return F.linear(x, weight, bias)
        return linear_pointwise(x, weight, bias, "none", [], "")

    return linear
