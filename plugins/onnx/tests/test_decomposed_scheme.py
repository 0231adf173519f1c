"""Quantized ops that exist only as decompositions into core primitives run on torch and onnx.

A throwaway W8A8 scheme (int8 activations per tensor, int8 weights per channel) registers an op
and its decomposition, and no backend code: both backends must compute what a hand-written
numpy reference does. Then the fused patterns the backends register for FP8 and INT4 layers
must give what lowering the same decomposition node by node gives.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler_core import hookimpl
from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.formats.int4 import pack_int4
from compiler_core.host import Host
from compiler_core.ir import GraphBuilder, Node, OpSpec, validate
from compiler_core.lowering import Decomposition, FusedPattern, LoweringTable
from compiler_core.runtime.context import ForwardContext

IN, OUT = 40, 24


def decompose_w8a8(node: Node, graph) -> list[Node]:
    n, p = node.name, node.params
    return [
        Node(f"{n}.qx", "quantize", node.inputs, (f"{n}.xq",), {"scale": p["input_scale"]}, {"dtype": "int8"}),
        Node(f"{n}.dqx", "dequantize", (f"{n}.xq",), (f"{n}.x",), {"scale": p["input_scale"]}, {"dtype": "int8"}),
        Node(
            f"{n}.dqw",
            "dequantize",
            (),
            (f"{n}.w",),
            {"quantized": p["weight"], "scale": p["weight_scale"]},
            {"dtype": "int8", "axis": 0},
        ),
        Node(n, "matmul", (f"{n}.x", f"{n}.w"), node.outputs, {"bias": p["bias"]}),
    ]


class W8A8:
    """The whole scheme, as far as lowering goes: an op and its decomposition."""

    @hookimpl
    def register_ops(self, register):
        register(
            OpSpec(
                "toy_w8a8_linear",
                "round(x / input_scale) * input_scale @ (weight * weight_scale[:, None]).T + bias",
                params=("weight", "weight_scale", "input_scale", "bias"),
            )
        )

    @hookimpl
    def register_lowerings(self, register):
        register(Decomposition("toy_w8a8_linear", decompose_w8a8))


def one_node_graph(op: str, params: dict[str, tuple[list[int], str]], **attrs):
    g = GraphBuilder("one")
    roles = {role: g.param(f"fc.{role}", shape, dtype) for role, (shape, dtype) in params.items()}
    y = g.add(op, ["x"], name="fc", params=roles, **attrs)
    return g.build(["x"], [y], attrs={"dtype": "float32", "hidden_size": IN})


def torch_output(registry, graph, weights, x, table=None) -> tuple[np.ndarray, GraphExecutor]:
    executor = GraphExecutor(registry, graph, weights, lowerings=table)
    ctx = ForwardContext.for_prompt(torch.ones(x.shape[:2], dtype=torch.long))
    (y,) = executor.run({"x": x}, ctx).values()
    return y.numpy(), executor


def onnx_output(registry, graph, weights, x, out_dir, table=None, optimize=True) -> tuple[np.ndarray, onnx.ModelProto]:
    """onnxruntime's output for the exported graph; ``optimize=False`` runs the graph as written
    (onnxruntime's MatMulNBits fusion of an INT4 DequantizeLinear -> MatMul trades about 1% of
    accuracy for speed, which says nothing about the graph)."""
    from modelc_plugins.onnx.export import export_rank

    out_dir.mkdir()
    export_rank(registry, graph, weights, out_dir, 0, lowerings=table)
    path = out_dir / "rank0.onnx"
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    return y, onnx.load(str(path), load_external_data=False)


def test_scheme_declared_only_by_decomposition_matches_a_hand_written_reference(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weights = {
        "fc.weight": torch.randint(-128, 128, (OUT, IN), generator=gen, dtype=torch.int8),
        "fc.weight_scale": torch.rand(OUT, generator=gen) * 0.01 + 0.001,
        "fc.input_scale": torch.tensor([1 / 32]),  # a power of two: x / scale is exact in float32
        "fc.bias": torch.randn(OUT, generator=gen),
    }
    x = torch.randn(2, 3, IN, generator=gen) * 2
    x[0, 0, :4] = torch.tensor([10.0, -10.0, 3.97, -4.0])  # beyond 127 / 32: saturate
    params = {"weight": ([OUT, IN], "int8"), "weight_scale": ([OUT], "float32")}
    params |= {"input_scale": ([1], "float32"), "bias": ([OUT], "float32")}
    w = weights["fc.weight"].double().numpy() * weights["fc.weight_scale"].double().numpy()[:, None]
    xq = np.clip(np.round(x.double().numpy() * 32), -128, 127) / 32  # np.round: half to even
    want = xq @ w.T + weights["fc.bias"].double().numpy()
    registry = Host.load(extra={"toy_w8a8": W8A8()}).registry
    graph = validate(one_node_graph("toy_w8a8_linear", params), registry.ops)
    on_torch, _ = torch_output(registry, graph, weights, x)
    on_onnx, model = onnx_output(registry, graph, weights, x, tmp_path / "onnx")
    for got in (on_torch, on_onnx):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2 and "MatMul" in ops


def fp8_case():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT, IN, generator=gen)
    params = {"weight": ([OUT, IN], "float8_e4m3fn"), "bias": ([OUT], "float32")}
    params |= {"weights_scaling_factor": ([1], "float32"), "activation_scaling_factor": ([1], "float32")}
    weights = {
        "fc.weight": (weight / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn),
        "fc.weights_scaling_factor": torch.tensor([0.01]),
        "fc.activation_scaling_factor": torch.tensor([3.0 / 448]),
        "fc.bias": torch.randn(OUT, generator=gen),
    }
    return one_node_graph("fp8_linear", params), weights, (["torch:fp8_gemm"], "onnx:dequantized_matmul")


def awq_case():
    """INT4 in groups of 16 over 40 inputs: a ragged last group of 8, with a pre-quantization scale."""
    gen = torch.Generator().manual_seed(2)
    groups = -(-IN // 16)
    params = {"weight": ([OUT, IN // 2], "int8"), "weights_scaling_factor": ([OUT, groups], "float32")}
    params |= {"prequant_scaling_factor": ([IN], "float32"), "bias": ([OUT], "float32")}
    weights = {
        "fc.weight": pack_int4(torch.randint(-8, 8, (OUT, IN), generator=gen, dtype=torch.int8)),
        "fc.weights_scaling_factor": torch.rand(OUT, groups, generator=gen) * 0.1 + 0.01,
        "fc.prequant_scaling_factor": torch.rand(IN, generator=gen) + 0.5,
        "fc.bias": torch.randn(OUT, generator=gen),
    }
    # The pre-quantization scale is a step of its own on torch (channel_scale), before the INT4 GEMM.
    patterns = ["torch:channel_scale", "torch:int4_gemm"]
    return one_node_graph("awq_linear", params, group_size=16), weights, (patterns, "onnx:dequantized_matmul")


@pytest.mark.parametrize("case", [fp8_case, awq_case], ids=["fp8", "int4_awq"])
def test_fused_patterns_are_taken_and_give_the_decomposition_result(registry, case, tmp_path):
    graph, weights, (torch_patterns, onnx_pattern) = case()
    if graph.nodes[0].op not in registry.ops:
        pytest.skip(f"the plugin that registers {graph.nodes[0].op} is not loaded")
    validate(graph, registry.ops)
    table = registry.lowerings
    unfused = LoweringTable([e for e in table.entries() if not isinstance(e, FusedPattern)])
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(3))

    fused_y, fused_run = torch_output(registry, graph, weights, x)
    plain_y, plain_run = torch_output(registry, graph, weights, x, unfused)
    assert [f"torch:{s.fused.name}" for s in fused_run.steps if s.fused] == torch_patterns
    assert not any(s.fused for s in plain_run.steps) and plain_run.steps[-1].root.op == "matmul"
    np.testing.assert_allclose(fused_y, plain_y, rtol=1e-5, atol=1e-5)

    fused_onnx, fused_model = onnx_output(registry, graph, weights, x, tmp_path / "fused", optimize=False)
    plain_onnx, plain_model = onnx_output(registry, graph, weights, x, tmp_path / "plain", unfused, optimize=False)
    np.testing.assert_allclose(fused_onnx, plain_onnx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused_onnx, fused_y, rtol=1e-5, atol=1e-5)
    # Fused: the stored weight's DequantizeLinear feeds MatMul directly (what TensorRT fuses);
    # unfused, the weight is dequantized as stored and transposed in the graph.
    dequantized = {n.output[0] for n in fused_model.graph.node if n.op_type == "DequantizeLinear"}
    assert any(n.op_type == "MatMul" and n.input[1] in dequantized for n in fused_model.graph.node), onnx_pattern
    assert "Transpose" not in {n.op_type for n in fused_model.graph.node}
    assert "Transpose" in {n.op_type for n in plain_model.graph.node}
