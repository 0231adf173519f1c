"""The ``onnx`` backend plugin: the IR lowered to standard ONNX, run with onnxruntime.

Its lowerings (``register_lowerings`` entries for ``backend="onnx"``: the core ops, the quantization
primitives and a fused dequantize-into-MatMul pattern) are also what the ``tensorrt`` backend feeds
to TensorRT's ONNX parser. A quantized op needs no ONNX code of its own when it registers a
decomposition into the primitives; a plugin can still register ``Lowering(op, "onnx", fn)`` with the
:class:`modelc_plugins.onnx.lowering.OnnxLowering` context (see docs/ONNX_TENSORRT.md).
"""

from __future__ import annotations

from compiler_core import hookimpl
from compiler_core.lowering import Lowering

__version__ = "0.1.0"


@hookimpl
def register_backends(register) -> None:
    from modelc_plugins.onnx.backend import OnnxBackend

    register(OnnxBackend())


@hookimpl
def register_lowerings(register) -> None:
    try:
        from modelc_plugins.onnx.ops import CORE_LOWERINGS
        from modelc_plugins.onnx.quant import DEQUANTIZED_MATMUL, QUANT_LOWERINGS
    except ModuleNotFoundError as exc:
        # The onnx extra is optional: without the onnx package there is nothing to lower with, and
        # the backend says what to install when it is asked for (OnnxBackend.unavailable_reason).
        if exc.name != "onnx" and not (exc.name or "").startswith("onnx."):
            raise
        return
    for op, lower in {**CORE_LOWERINGS, **QUANT_LOWERINGS}.items():
        register(Lowering(op, "onnx", lower))
    register(DEQUANTIZED_MATMUL)
