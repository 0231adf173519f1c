"""The torch backend's fused patterns: fast kernels for trees of ops, chiefly what quantized ops
decompose into (``quantize`` / ``dequantize`` / ``matmul``).

Each module defines one :class:`compiler_core.lowering.FusedPattern` for ``backend="torch"``; the
core registers :data:`PATTERNS` through ``register_lowerings``, and the lowering loop takes a
pattern wherever it matches (larger patterns first) instead of lowering the matched nodes one by
one. A pattern's kernel must compute what those nodes compute (tests compare the two).

* :mod:`.fp8`: FP8 activation x FP8 weight GEMM: the Triton FP8 GEMM for decode and
  ``torch._scaled_mm`` beyond on sm_89+, emulated elsewhere.
* :mod:`.int4`: blocked INT4 weight x activation: the Triton INT4 GEMM on sm_89+, the CUDA int4
  GEMM (tinygemm) for decode on other GPUs (and at one row where it measured faster).
* :mod:`.residual`: ``add(x, add(a, b))`` (Falcon's parallel-attention residual) as one Triton
  elementwise kernel on sm_89+, the two torch adds elsewhere.
* :mod:`.channel_scale`: an INT4-AWQ layer's pre-quantization scale as a vectorized Triton kernel
  on sm_89+, torch's broadcast multiply elsewhere.
* :mod:`.epilogue`: the FP8 and INT4 GEMMs with the GELU and / or channel scale that read their
  output, which their Triton kernels apply before storing it.

The Triton kernels themselves live in :mod:`compiler_core.backends.torch.cuda`; the patterns take
them behind its ``triton_ready`` check, after a probe against the other kernel.
* :mod:`.dense`: any other dequantized weight, dequantized once at lowering time into a dense
  weight that takes the CPU oneDNN / bfloat16 linear.

To add a kernel: write a module here with a ``Pattern``, a predicate and
``fn(match, low) -> kernel``, and add its pattern to :data:`PATTERNS`; a plugin can instead register
its own ``FusedPattern`` for ``"torch"`` from its ``register_lowerings``.
"""

from __future__ import annotations

from compiler_core.backends.torch.fused.channel_scale import CHANNEL_SCALE
from compiler_core.backends.torch.fused.dense import DEQUANTIZED_GEMM
from compiler_core.backends.torch.fused.fp8 import FP8_GEMMS
from compiler_core.backends.torch.fused.int4 import INT4_GEMMS
from compiler_core.backends.torch.fused.residual import RESIDUAL_ADD

PATTERNS = (*FP8_GEMMS, *INT4_GEMMS, DEQUANTIZED_GEMM, RESIDUAL_ADD, CHANNEL_SCALE)
