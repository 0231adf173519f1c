"""``matmul(x, dequantize(weight))`` with the weight dequantized once, at lowering time.

A CPU multiplies a dense weight fastest (oneDNN / the bfloat16 kernel of ``cpu_linear``), so the
weight is dequantized into the compute dtype once and the product runs like any float linear.
"""

from __future__ import annotations

import torch

from compiler_core.backends.torch.kernels import Kernel, TorchLowering, dense_linear
from compiler_core.backends.torch.quant import dequantize_codes, is_blocked, out_dtype_of, stored_codes
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern


def is_stored_weight(node: Node) -> bool:
    """A ``dequantize`` of a 2-D quantized parameter (no input value)."""
    return not node.inputs and "quantized" in node.params


def is_int4_groups(node: Node) -> bool:
    """A stored int4 weight [out, in] with blocked scales along ``in`` (groups of input channels)."""
    return (
        is_stored_weight(node)
        and node.attrs["dtype"] == "int4"
        and is_blocked(node.attrs)
        and int(node.attrs["axis"]) in (1, -1)
    )


def dequantized_weight(node: Node, low: TorchLowering) -> torch.Tensor:
    """The dense weight a ``dequantize`` of a stored weight produces."""
    return dequantize_codes(stored_codes(node, low), low.param(node, "scale"), node.attrs, out_dtype_of(node, low))


def folded_gemm(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of ``matmul(x, dequantize(weight))`` with the weight dequantized now."""
    return dense_linear(dequantized_weight(match.node("weight"), low), low.param(match.root, "bias"))


DEQUANTIZED_GEMM = FusedPattern(
    "dequantized_gemm",
    "torch",
    Pattern(
        "matmul",
        (None, Pattern("dequantize", where=lambda n: is_stored_weight(n) and not is_int4_groups(n), name="weight")),
    ),
    folded_gemm,
)
