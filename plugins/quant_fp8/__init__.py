"""FP8 for modelc: post-training FP8 E4M3 quantization of weights, activations and the KV cache.

``modelc quantize --qformat fp8 [--kv_cache_dtype fp8]`` calibrates per-tensor amax scales
(:mod:`modelc_plugins.quant_fp8.scheme`), stores float8_e4m3fn weights with their scales, and declares
the resulting ``fp8_linear`` op as core quantize / dequantize / matmul primitives
(:mod:`modelc_plugins.quant_fp8.decomposition`), which every backend lowers and the torch backend
fuses into one FP8 GEMM. The FP8 KV cache
needs no lowering of its own: the core attention op stores its cache in the ``kv_cache_dtype``
attribute's type with the ``kv_cache_scaling_factor`` parameter.
"""

from __future__ import annotations

from compiler_core import hookimpl
from compiler_core.lowering import Decomposition
from modelc_plugins.quant_fp8.decomposition import decompose_fp8_linear
from modelc_plugins.quant_fp8.scheme import FP8_LINEAR, FP8Scheme

__version__ = "0.1.0"


@hookimpl
def register_ops(register) -> None:
    register(FP8_LINEAR)


@hookimpl
def register_quant_schemes(register) -> None:
    register(FP8Scheme())


@hookimpl
def register_lowerings(register) -> None:
    register(Decomposition(FP8_LINEAR.name, decompose_fp8_linear))
