"""The ``tensorrt`` backend plugin: TensorRT engines built from the onnx plugin's graphs.

Works with NVIDIA's datacenter ``tensorrt`` or with TensorRT-RTX (``tensorrt_rtx``), whichever
imports; TensorRT-RTX builds engines on machines without a GPU. See docs/ONNX_TENSORRT.md.
"""

from __future__ import annotations

from compiler_core import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_backends(register) -> None:
    from modelc_plugins.tensorrt.backend import TensorRTBackend

    register(TensorRTBackend())
