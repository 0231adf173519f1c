"""``matmul(x, dequantize(int4 weight in groups))`` (INT4 AWQ's decomposition) on torch.

CPU: the weight is dequantized once, at lowering time, into the compute dtype (a dense GEMM is
the fastest thing a CPU can do with it; see :mod:`.dense`). A ragged last group is just scaled by
its own scale.

CUDA: the weight stays int4 in device memory (a quarter of the fp16 bytes).

* Models in bfloat16, float16 or float32 with groups of 32+ on sm_89+ GPUs with Triton installed
  use the Triton INT4 GEMM (``compiler_core/backends/torch/cuda/int4_gemm.py``): it reads the
  packed weight and scales directly (split-K at decode). A ragged layer's rows are padded to
  whole groups once, at lowering time. Each layer compares it once with the reference
  dequantization on probe inputs and falls back (with a warning) to the paths below; one-row
  calls take tinygemm instead where that measured faster at load time. Calls of many rows
  (prefill, from a threshold each layer times at load) dequantize the weight with one Triton
  kernel into a temporary and run cuBLAS (see :func:`triton_int4_kernel`).
* Otherwise, bfloat16 models with group size 32/64/128/256 use PyTorch's int4 GEMM
  (``aten._weight_int4pack_mm``, the "tinygemm" kernel behind gpt-fast and torchao) for calls
  of at most ``TINYGEMM_MAX_ROWS`` tokens (decode): it reads the packed weight directly. Its
  weight layout is device-specific and cannot be checked on a CPU, so each layer compares it
  once, at lowering time, with the reference dequantization on a probe input and falls back
  (with a warning) if they disagree or the op is unavailable. The kernel needs K in whole
  groups (and whole tiles); a ragged layer's weight is zero-padded once, at lowering time, to
  whole groups (see :func:`tinygemm_operands`) and its activation per call.
* Otherwise (prefill, float16/float32 models) each call dequantizes into a temporary in the
  compute dtype and runs a dense GEMM.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.backends.torch.cuda.epilogue import NONE, Epilogue
from compiler_core.backends.torch.cuda.tiling import MIN_GROUP_SIZE, probe_rows
from compiler_core.backends.torch.fused.dense import dequantized_weight, is_int4_groups
from compiler_core.backends.torch.fused.epilogue import GEMM, epilogue_of, with_epilogue, with_epilogues
from compiler_core.backends.torch.kernels import Kernel, TorchLowering, dense_linear
from compiler_core.backends.torch.quant import out_dtype_of
from compiler_core.formats.int4 import scale_groups_, unpack_int4
from compiler_core.lowering import FusedPattern, Match, Pattern

#: Tokens per call up to which the CUDA int4 GEMM is used; larger calls are compute-bound and
#: run faster as dequantize + dense GEMM.
TINYGEMM_MAX_ROWS = 16
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantize_in_dtype(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed int4 ``[out, in / 2]`` times group scales ``[out, groups]`` (in ``dtype``) -> ``[out, in]`` in ``dtype``.

    Computed in ``dtype``, in place on the codes' temporary: no full-size copy of the scales.
    A code in [-8, 7] times a scale rounds once, so this equals the float32 product rounded.
    """
    return scale_groups_(unpack_int4(packed).to(dtype), scales, group_size)


def tinygemm_codes(packed: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """uint8 ``[out, groups * group_size / 2]``: the codes as ``aten._convert_weight_to_int4pack`` takes them.

    Its codes are unsigned (q + 8) with the even input index in the *high* nibble. A ragged last
    group is padded with code 0 (unsigned 8) up to whole groups: the kernel then multiplies the
    padded inputs by a weight of exactly 0, whatever its group's scale.
    """
    q = unpack_int4(packed).to(torch.int32)
    pad = groups * group_size - q.shape[1]
    if pad:
        q = F.pad(q, (0, pad))
    u = q + 8
    return ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8)


def tinygemm_operands(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weight and scales in ``aten._weight_int4pack_mm``'s layout, or None when it does not apply.

    It dequantizes as ``(u - 8) * scale + zero`` from ``scales_and_zeros [groups, out, 2]``;
    symmetric INT4 has zero 0. K is the padded width ``groups * group_size``: for a ragged layer
    the caller pads the activation to it as well (see :func:`tinygemm_matmul`).
    """
    out, groups = scales.shape
    k = groups * group_size
    tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    if tiles is None or out % 8:
        return None
    u8 = tinygemm_codes(packed, groups, group_size)
    weight = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), tiles)
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).transpose(0, 1).contiguous()
    return weight, scales_and_zeros


def tinygemm_matmul(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, name: str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x2d -> x2d @ W.T`` through the CUDA int4 GEMM, if it applies and passes a probe.

    A layer whose input dim is not whole groups (a ragged last group) keeps the int4 kernel: its
    weight was padded with zero codes at lowering time (a few columns, under one group per row)
    and each call pads the activation with zeros to match. The alternative, dequantizing such
    layers per call, would read four times the weight bytes on every decode step; the padded
    activation is at most ``TINYGEMM_MAX_ROWS`` rows, a copy the contiguous activation the
    kernel requires would often cost anyway.
    """
    if scales.dtype != torch.bfloat16 or group_size not in TINYGEMM_GROUP_SIZES:
        return None
    in_features = packed.shape[1] * 2
    try:
        operands = tinygemm_operands(packed, scales, group_size)
        if operands is None:
            return None
        weight, scales_and_zeros = operands
        pad = scales.shape[1] * group_size - in_features

        def matmul(x2d: torch.Tensor) -> torch.Tensor:
            # The int4 GEMM requires a contiguous activation (a beam-reordered or sliced input is
            # not); F.pad returns a new contiguous tensor with zeros in the padded columns.
            x2d = F.pad(x2d, (0, pad)) if pad else x2d.contiguous()
            return torch.ops.aten._weight_int4pack_mm(x2d, weight, group_size, scales_and_zeros)

        gen = torch.Generator(device=packed.device).manual_seed(0)
        probe = torch.randn(4, in_features, generator=gen, device=packed.device).to(torch.bfloat16)
        want = probe.float() @ dequantize_in_dtype(packed, scales, group_size, torch.bfloat16).float().T
        got = matmul(probe).float()
    except (RuntimeError, NotImplementedError) as exc:
        warnings.warn(f"{name}: int4 GEMM unavailable ({exc}); dequantizing per call", stacklevel=2)
        return None
    # bfloat16 accumulation differs from the float32 reference by a few ulps of the output.
    if not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max())):
        warnings.warn(
            f"{name}: int4 GEMM disagrees with the reference dequantization; dequantizing per call", stacklevel=2
        )
        return None
    return matmul


def int4_gemm(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of ``matmul(x, dequantize(int4 weight in groups))``: the Triton INT4 GEMM where it is
    ready and passes its probes, else the device's other kernel (see the module docstring)."""
    gemm, node = match.node(GEMM), match.node("weight")
    bias = low.param(gemm, "bias")
    dtype = out_dtype_of(node, low)
    packed = low.param(node, "quantized")
    scales = low.param(node, "scale").to(dtype)
    group_size = int(node.attrs["block_size"])
    epilogue = epilogue_of(match, low)
    if low.device.type == "cpu":
        fallback = dense_linear(dequantized_weight(node, low), bias)
    else:
        fallback = torch_cuda_kernel(packed, scales, group_size, bias, dtype, gemm.name)
    fallback = with_epilogue(fallback, epilogue)
    # Not only in the CUDA branch: triton_ready is False on a CPU anyway, and the tests force it on
    # there, so that this hook-in runs under Triton's interpreter (against the dense fallback).
    if triton_ready(low.device) and dtype in TRITON_DTYPES and group_size >= MIN_GROUP_SIZE:
        kernel = triton_int4_kernel(packed, scales, group_size, bias, gemm.name, epilogue)
        if kernel is not None:
            one_row = torch.randn(1, 1, packed.shape[1] * 2, device=low.device).to(dtype)
            return with_faster_gemv(kernel, fallback, one_row)
    return fallback


#: Row counts at which each layer times dequantize + cuBLAS against the Triton GEMM at lowering:
#: the smallest where the former is faster becomes the layer's prefill threshold. A dense GEMM of
#: M rows costs ~M x the weight's FLOPs while the dequantization is a fixed ~2.5 bytes per weight
#: (int4 read, bf16 written), so once cuBLAS wins at some M it wins at every larger M; two probes
#: bound where that happens without timing every M (on an H200 the Triton GEMM lost to it at
#: 1024 rows by ~3x: docs/PERFORMANCE.md).
PREFILL_PROBE_ROWS = (128, 512)


def triton_int4_kernel(
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    name: str,
    epilogue: Epilogue = NONE,
) -> Kernel | None:
    """The Triton INT4 kernel of one layer (``epilogue`` after the GEMM), or None (with a warning) if
    it fails or disagrees with the reference dequantization on probe inputs (``scales`` in the
    compute dtype).

    Calls of at least the layer's prefill threshold (see :data:`PREFILL_PROBE_ROWS`; stored as the
    kernel's ``prefill_rows``, None for never) dequantize the weight with one Triton kernel into a
    temporary in the compute dtype (bit-exact with :func:`dequantize_in_dtype`, checked here) and
    run cuBLAS on it; smaller calls run the Triton INT4 GEMM.
    """
    from compiler_core.backends.torch.cuda.int4_gemm import dequantize_int4, int4_linear, prepare_int4_weight
    from compiler_core.backends.torch.cuda.splitk import TileLocks

    dtype = scales.dtype
    weight = prepare_int4_weight(packed, scales, group_size)
    reference = dequantize_in_dtype(packed, scales, group_size, dtype)
    locks = TileLocks(packed.device)

    def int4_gemm_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, weight, bias, locks=locks, epilogue=epilogue)

    def dequant_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        return epilogue.apply(F.linear(x, dequantize_int4(weight, dtype), bias))

    dense = reference.float()
    gen = torch.Generator(device=packed.device).manual_seed(0)
    try:
        for rows in probe_rows("int4", weight.out_features, weight.in_features):
            probe = torch.randn(rows, weight.in_features, generator=gen, device=packed.device).to(dtype)
            want = probe.float() @ dense.T
            if bias is not None:
                want = want + bias.float()
            want = epilogue.apply(want)
            got = int4_gemm_kernel(None, probe).float()
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
                warnings.warn(f"{name}: the Triton int4 GEMM disagrees with the reference; not using it", stacklevel=2)
                return None
    except Exception as exc:  # a Triton compile or launch failure on this GPU: keep the other kernels
        warnings.warn(f"{name}: the Triton int4 GEMM failed ({type(exc).__name__}: {exc}); not using it", stacklevel=2)
        return None
    prefill_rows = prefill_threshold(weight, reference, int4_gemm_kernel, dequant_kernel, name)

    def int4_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        if prefill_rows is not None and x.numel() >= prefill_rows * x.shape[-1]:
            return dequant_kernel(ctx, x)
        return int4_gemm_kernel(ctx, x)

    int4_kernel.prefill_rows = prefill_rows  # type: ignore[attr-defined]  # for tests and benchmarks
    return int4_kernel


def prefill_threshold(weight, reference: torch.Tensor, gemm: Kernel, dequant: Kernel, name: str) -> int | None:
    """The smallest of :data:`PREFILL_PROBE_ROWS` at which ``dequant`` (dequantize + cuBLAS) times
    faster than ``gemm``, or None: never, also when the dequantization kernel fails or is not
    bit-exact with ``reference`` (with a warning)."""
    from compiler_core.backends.torch.cuda import int4_gemm
    from compiler_core.backends.torch.cuda.timing import first_is_faster

    try:
        if not torch.equal(int4_gemm.dequantize_int4(weight, reference.dtype), reference):
            warnings.warn(f"{name}: the int4 dequantization kernel disagrees with the reference", stacklevel=3)
            return None
        for rows in PREFILL_PROBE_ROWS:
            probe = torch.randn(1, rows, weight.in_features, device=reference.device).to(reference.dtype)
            if first_is_faster(lambda p=probe: dequant(None, p), lambda p=probe: gemm(None, p), reference.device):
                return rows
    except Exception as exc:  # a compile, launch or capture failure: prefill keeps the Triton GEMM
        warnings.warn(f"{name}: the int4 prefill path failed ({type(exc).__name__}: {exc}); not using it", stacklevel=3)
    return None


def with_faster_gemv(triton_kernel: Kernel, fallback: Kernel, probe: torch.Tensor) -> Kernel:
    """``triton_kernel``, except for one-row calls when ``fallback`` (tinygemm's GEMV) is faster there.

    Which GEMV wins at one row depends on the GPU and the shape; the Triton GEMM wins from a few
    rows on (tinygemm collapses beyond), so only the one-row case is decided, by timing both once.
    """
    from compiler_core.backends.torch.cuda.timing import first_is_faster

    try:
        if first_is_faster(lambda: triton_kernel(None, probe), lambda: fallback(None, probe), probe.device):
            return triton_kernel
    except RuntimeError as exc:  # the timing's graph capture failed: keep the checked Triton kernel
        warnings.warn(f"timing the one-row int4 kernels failed ({exc}); using the Triton GEMM", stacklevel=2)
        return triton_kernel

    def int4_kernel(ctx, x: torch.Tensor) -> torch.Tensor:
        return (fallback if x.numel() == x.shape[-1] else triton_kernel)(ctx, x)

    return int4_kernel


def torch_cuda_kernel(
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    name: str,
) -> Kernel:
    """The CUDA kernel without Triton: tinygemm for up to ``TINYGEMM_MAX_ROWS`` rows, else dequantize per call."""
    int4_matmul = tinygemm_matmul(packed, scales, group_size, name)
    out_features = scales.shape[0]

    def on_device(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if int4_matmul is not None and rows <= TINYGEMM_MAX_ROWS:
            y = int4_matmul(x.reshape(rows, x.shape[-1])).reshape(*x.shape[:-1], out_features)
            return y if bias is None else y + bias
        return F.linear(x, dequantize_in_dtype(packed, scales, group_size, dtype), bias)

    return on_device


INT4_GEMM = FusedPattern(
    "int4_gemm",
    "torch",
    Pattern("matmul", (None, Pattern("dequantize", where=is_int4_groups, name="weight")), name=GEMM),
    int4_gemm,
)
#: The INT4 GEMM and its forms with a GELU and / or a channel scale after it.
INT4_GEMMS = with_epilogues(INT4_GEMM)
