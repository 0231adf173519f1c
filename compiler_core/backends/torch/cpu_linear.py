"""Linear layers on CPU for the few-row case (decode), where streaming the weight is the cost.

Two paths, both computing in float32:

- **oneDNN.** ``F.linear`` on CPU goes to the BLAS (MKL in the official wheels), which streams a
  weight matrix for a handful of rows at 15-20 GB/s on an AMD EPYC, well below what the memory
  delivers. oneDNN's JIT inner product reads the same row-major weight, unchanged and without a
  packed copy, 1.3-3x faster for up to ~128 rows, and slower for large row counts, where BLAS's
  GEMM blocking wins. ``MODELC_ONEDNN_LINEAR=0`` turns this path off.
- **bfloat16 weights.** A float32 engine built from a bfloat16 checkpoint (every published
  Falcon) holds float32 weights whose low 16 bits are all zero. Such a weight is kept as bfloat16,
  which loses nothing and halves both its memory and the bytes a decode step streams, and is
  multiplied in float32 by the C kernel ``csrc/bf16_linear.c`` (see :mod:`.native`). A bfloat16
  engine's weights take the same kernel: its inputs widen exactly to float32 and each output is
  rounded to bfloat16 once, after float32 accumulation, as torch's own bfloat16 linear does. Rows
  beyond :data:`MAX_BF16_KERNEL_ROWS` widen the weight, block by block, for a float32 GEMM.
  ``MODELC_BF16_WEIGHTS=0`` turns this path off.

``bench/bench_decode.py`` shows both on a whole decode step.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compiler_core.backends.torch.native import load_kernel_library

# Above this many rows (batch x positions) BLAS's GEMM is as fast or faster than oneDNN's
# inner product (measured for hidden 1024/4096 and a 65024-row vocabulary on 2 EPYC cores).
MAX_ONEDNN_ROWS = 128
# oneDNN spends ~30 us per call before it reads a byte (primitive lookup); below ~4 MiB of
# weights the BLAS call is done by then.
MIN_ONEDNN_WEIGHT_ELEMENTS = 1 << 20
# The bfloat16 kernel applies each weight vector it loads to up to 4 rows; by 16 rows it is
# compute-bound and a float32 GEMM over a widened copy of the weight is faster.
MAX_BF16_KERNEL_ROWS = 8
# Below this many elements a weight stays in cache between steps and halving its bytes buys nothing.
MIN_BF16_WEIGHT_ELEMENTS = 1 << 20
# Beyond MAX_BF16_KERNEL_ROWS, a bfloat16-held weight is widened to float32 this many elements at a
# time (4 MiB, which stays in the last-level cache for the GEMM that follows).
WIDEN_BLOCK_ELEMENTS = 1 << 20


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


@functools.cache
def bf16_kernel() -> Callable[..., None] | None:
    """The C function ``bf16_linear`` (see ``csrc/bf16_linear.c``), or None where it is off or cannot be built."""
    if os.environ.get("MODELC_BF16_WEIGHTS", "1") == "0":
        return None
    library = load_kernel_library("bf16_linear")
    if library is None:
        return None
    kernel = library.bf16_linear
    kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    kernel.restype = None
    return kernel


def bf16_valued(weight: torch.Tensor) -> bool:
    """True when every element of a float32 ``weight`` is a bfloat16 number (low 16 bits zero)."""
    if weight.dtype != torch.float32:
        return False
    bits = weight.detach().reshape(-1).view(torch.int32)
    # In slices through one scratch buffer: a whole-tensor mask would briefly double the memory of
    # a vocabulary-sized matrix, and a fresh buffer per slice leaves the allocator fragmented.
    scratch = torch.empty(min(bits.numel(), 1 << 20), dtype=torch.int32)
    for part in bits.split(1 << 20):
        if bool(torch.bitwise_and(part, 0xFFFF, out=scratch[: part.numel()]).any()):
            return False
    return True


def bf16_storage(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` held as bfloat16 for :func:`bf16_linear`, else None.

    A bfloat16 weight is returned as it is; a float32 one is copied when every value is a
    bfloat16 number (nothing is lost). None for other weights, small ones, and where the kernel
    does not run."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if weight.numel() < MIN_BF16_WEIGHT_ELEMENTS or bf16_kernel() is None:
        return None
    if weight.dtype == torch.bfloat16:
        return weight
    return weight.to(torch.bfloat16) if bf16_valued(weight) else None


def held_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    """How the CPU runtime holds a loaded weight: as :func:`bf16_storage` gives it, or as it is."""
    held = bf16_storage(weight)
    return weight if held is None else held


def bf16_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear over ``weight`` held as bfloat16 (from :func:`bf16_storage`) for float32 or bfloat16
    inputs, accumulated in float32; the output has the input's dtype."""
    kernel = bf16_kernel()
    assert kernel is not None and weight.dtype == torch.bfloat16, "use bf16_storage() to get the weight"
    bias = None if bias is None else bias.float().contiguous()
    out_features, in_features = weight.shape

    def run_kernel(x: torch.Tensor, rows: int) -> torch.Tensor:
        """The kernel on contiguous float32 ``x``: one allocation, no other torch op (each op
        dispatched during decode costs microseconds)."""
        y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
        bias_ptr = None if bias is None else bias.data_ptr()
        threads = torch.get_num_threads()
        kernel(x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(), rows, out_features, in_features, threads)
        return y

    def linear(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // in_features
        if x.dtype not in (torch.float32, torch.bfloat16) or x.requires_grad:
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if x.dtype == torch.float32 and rows <= MAX_BF16_KERNEL_ROWS and x.is_contiguous():
            return run_kernel(x, rows)
        x32 = x.float().contiguous()
        if rows <= MAX_BF16_KERNEL_ROWS:
            return run_kernel(x32, rows).to(x.dtype)
        y = _widened_linear(x32.reshape(rows, in_features), weight, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)

    return linear


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of float32 rows ``x`` [rows, in] with a bfloat16 ``weight``, widened block by block."""
    out_features, in_features = weight.shape
    y = torch.empty((x.shape[0], out_features), dtype=torch.float32)
    block = max(1, WIDEN_BLOCK_ELEMENTS // in_features)
    widened = torch.empty((min(block, out_features), in_features), dtype=torch.float32)
    onednn = x.shape[0] <= MAX_ONEDNN_ROWS and onednn_linear_supported()
    for start in range(0, out_features, block):
        stop = min(start + block, out_features)
        w = widened[: stop - start]
        w.copy_(weight[start:stop])
        b = None if bias is None else bias[start:stop]
        y[:, start:stop] = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "") if onednn else F.linear(x, w, b)
    return y
