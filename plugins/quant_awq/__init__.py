"""INT4 group-wise AWQ for modelc (``--qformat int4_awq``, TensorRT-LLM's ``W4A16_AWQ``).

* :mod:`modelc_plugins.quant_awq.int4`: symmetric group quantization, int4 packing (pure functions).
* :mod:`modelc_plugins.quant_awq.search`: AWQ scale and clip searches (pure functions).
* :mod:`modelc_plugins.quant_awq.calibrate`: where scales go (the architecture's ``scale_groups``), calibration.
* :mod:`modelc_plugins.quant_awq.transform`: the ``awq_linear`` op and the per-rank graph rewrite.
* :mod:`modelc_plugins.quant_awq.decomposition`: ``awq_linear`` as core dequantize / matmul primitives,
  which every backend lowers (the torch backend's fused int4 GEMM included).
"""

from __future__ import annotations

from compiler_core import hookimpl
from compiler_core.lowering import Decomposition
from modelc_plugins.quant_awq.decomposition import decompose_awq_linear
from modelc_plugins.quant_awq.transform import AWQ_LINEAR, OP

__version__ = "0.1.0"


@hookimpl
def register_ops(register) -> None:
    register(AWQ_LINEAR)


@hookimpl
def register_quant_schemes(register) -> None:
    from modelc_plugins.quant_awq.scheme import Int4AwqScheme

    register(Int4AwqScheme())


@hookimpl
def register_lowerings(register) -> None:
    register(Decomposition(OP, decompose_awq_linear))
