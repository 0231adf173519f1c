"""The ``onnx`` backend plugin: the IR lowered to standard ONNX, run with onnxruntime.

Its lowering (``lower_layer`` with ``backend="onnx"``) is also what the ``tensorrt`` backend feeds
to TensorRT's ONNX parser. Quantization plugins lower their own ops through the same hook with
the :class:`modelc_plugins.onnx.lowering.OnnxLowering` context (see docs/ONNX_TENSORRT.md).
"""

from __future__ import annotations

from typing import Any

from compiler_core import hookimpl
from compiler_core.ir import Graph, Node

__version__ = "0.1.0"


@hookimpl
def register_backends(register) -> None:
    from modelc_plugins.onnx.backend import OnnxBackend

    register(OnnxBackend())


@hookimpl(trylast=True)
def lower_layer(node: Node, graph: Graph, backend: str, context: Any):
    if backend != "onnx":
        return None
    from modelc_plugins.onnx.ops import CORE_LOWERINGS

    lower = CORE_LOWERINGS.get(node.op)
    return None if lower is None else lower(node, context)
