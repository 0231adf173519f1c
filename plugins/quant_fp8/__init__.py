"""FP8 for modelc: post-training FP8 E4M3 quantization of weights, activations and the KV cache.

``modelc quantize --qformat fp8 [--kv_cache_dtype fp8]`` calibrates per-tensor amax scales
(:mod:`modelc_plugins.quant_fp8.scheme`), stores float8_e4m3fn weights with their scales, and lowers
the resulting ``fp8_linear`` op for the torch backend (:mod:`modelc_plugins.quant_fp8.torch_lowering`:
``torch._scaled_mm`` on Hopper, exact emulation elsewhere) and the onnx backend
(:mod:`modelc_plugins.quant_fp8.onnx_lowering`: FP8 QuantizeLinear/DequantizeLinear). The FP8 KV cache
needs no lowering of its own: the core attention op stores its cache in the ``kv_cache_dtype``
attribute's type with the ``kv_cache_scaling_factor`` parameter.
"""

from __future__ import annotations

from typing import Any

from modelc_plugins.quant_fp8.scheme import FP8_LINEAR, FP8Scheme

from compiler_core import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_ops(register) -> None:
    register(FP8_LINEAR)


@hookimpl
def register_quant_schemes(register) -> None:
    register(FP8Scheme())


@hookimpl
def lower_layer(node, graph, backend: str, context: Any):
    if node.op != FP8_LINEAR.name:
        return None
    if backend == "torch":
        from modelc_plugins.quant_fp8.torch_lowering import lower_fp8_linear

        return lower_fp8_linear(node, context)
    if backend == "onnx":
        from modelc_plugins.quant_fp8.onnx_lowering import lower_fp8_linear

        return lower_fp8_linear(node, context)
    return None
