"""``fp8_linear`` as core primitives, which every backend lowers::

    x ─quantize(activation_scaling_factor, float8_e4m3fn)─dequantize(activation_scaling_factor)─┐
    weight (float8_e4m3fn [out, in]) ─dequantize(weights_scaling_factor)──────────────────────matmul(+bias)

Both scales are per tensor. The torch backend runs this pattern as one FP8 GEMM
(:mod:`compiler_core.backends.torch.fused.fp8`: a Triton GEMM for decode and ``torch._scaled_mm``
beyond on Hopper, exact emulation elsewhere); the onnx backend writes it as QuantizeLinear /
DequantizeLinear around a MatMul, the form TensorRT turns into FP8 GEMMs. The plugin itself has
no backend code.
"""

from __future__ import annotations

from compiler_core.ir import Graph, Node

FP8 = "float8_e4m3fn"


def decompose_fp8_linear(node: Node, graph: Graph) -> list[Node]:
    """The primitive nodes of one ``fp8_linear`` node; the last writes its output."""
    (x,) = node.inputs
    name, a_scale = node.name, node.params["activation_scaling_factor"]
    bias = {"bias": node.params["bias"]} if "bias" in node.params else {}
    return [
        Node(f"{name}.quantize_input", "quantize", (x,), (f"{name}.input_codes",), {"scale": a_scale}, {"dtype": FP8}),
        Node(
            f"{name}.dequantize_input",
            "dequantize",
            (f"{name}.input_codes",),
            (f"{name}.input",),
            {"scale": a_scale},
            {"dtype": FP8},
        ),
        Node(
            f"{name}.dequantize_weight",
            "dequantize",
            (),
            (f"{name}.weight",),
            {"quantized": node.params["weight"], "scale": node.params["weights_scaling_factor"]},
            {"dtype": FP8},
        ),
        Node(name, "matmul", (f"{name}.input", f"{name}.weight"), node.outputs, bias),
    ]
