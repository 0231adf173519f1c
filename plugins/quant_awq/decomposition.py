"""``awq_linear`` as core primitives, which every backend lowers::

    x ─channel_scale(prequant_scaling_factor)──────────────────────────────────────────────────┐
    weight (int4 [out, in], packed) ─dequantize(weights_scaling_factor, axis 1, block group_size)─matmul(+bias)

The ``channel_scale`` is there only when the layer has a pre-quantization scale. The torch
backend fuses ``dequantize`` + ``matmul`` (:mod:`compiler_core.backends.torch.fused.int4`: a dense
weight on CPU, the Triton INT4 GEMM on sm_89+ GPUs, the CUDA int4 GEMM for decode on others);
the onnx backend writes the weight-only INT4 pattern TensorRT recognises (blocked
DequantizeLinear into MatMul, ragged groups padded). The plugin itself has no backend code.
"""

from __future__ import annotations

from compiler_core.ir import Graph, Node


def decompose_awq_linear(node: Node, graph: Graph) -> list[Node]:
    """The primitive nodes of one ``awq_linear`` node; the last writes its output."""
    (x,) = node.inputs
    name = node.name
    nodes = []
    if "prequant_scaling_factor" in node.params:
        nodes.append(
            Node(
                f"{name}.prequant",
                "channel_scale",
                (x,),
                (f"{name}.scaled_input",),
                {"scale": node.params["prequant_scaling_factor"]},
            )
        )
        x = f"{name}.scaled_input"
    attrs = {"dtype": "int4", "axis": 1, "block_size": int(node.attrs["group_size"])}
    params = {"quantized": node.params["weight"], "scale": node.params["weights_scaling_factor"]}
    nodes.append(Node(f"{name}.dequantize_weight", "dequantize", (), (f"{name}.weight",), params, attrs))
    bias = {"bias": node.params["bias"]} if "bias" in node.params else {}
    nodes.append(Node(name, "matmul", (x, f"{name}.weight"), node.outputs, bias))
    return nodes
