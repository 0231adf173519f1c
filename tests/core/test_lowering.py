"""The lowering table and its one loop: registration, refusal of duplicates, the order of
preference (fused pattern, the backend's lowering, decomposition) and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from compiler_core import hookimpl
from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.errors import ModelcError
from compiler_core.host import Host
from compiler_core.ir import GraphBuilder, Node, OpSpec
from compiler_core.lowering import Decomposition, FusedPattern, Lowering, LoweringTable, Pattern, plan_lowering
from compiler_core.runtime.context import ForwardContext
from compiler_core.testing import run_modelc


class LoweringPlugin:
    def __init__(self, *entries) -> None:
        self.entries = entries

    @hookimpl
    def register_lowerings(self, register):
        for entry in self.entries:
            register(entry)


def relu_kernel(node, low):
    return lambda ctx, x: torch.relu(x)


def test_duplicate_lowering_names_both_plugins():
    entry = Lowering("toy_op", "torch", relu_kernel)
    host = Host.with_plugins({"first_plugin": LoweringPlugin(entry), "second_plugin": LoweringPlugin(entry)})
    with pytest.raises(ModelcError) as info:
        _ = host.registry
    message = str(info.value)
    assert "lowering 'torch:toy_op' is registered twice" in message
    assert "'first_plugin'" in message and "'second_plugin'" in message


def test_a_second_lowering_of_a_core_op_names_core_and_a_different_backend_is_no_clash():
    shadow = Host.with_plugins({"shadow": LoweringPlugin(Lowering("gelu", "torch", relu_kernel))})
    with pytest.raises(ModelcError, match="by plugin 'core' and by plugin 'shadow'"):
        _ = shadow.registry
    elsewhere = Host.with_plugins({"elsewhere": LoweringPlugin(Lowering("gelu", "toy_backend", relu_kernel))})
    assert elsewhere.registry.lowerings.lowering("gelu", "toy_backend").fn is relu_kernel


def test_duplicate_decomposition_and_non_entry_are_refused_naming_the_plugin():
    decomposition = Decomposition("toy_op", lambda node, graph: [])
    twice = Host.with_plugins({"a": LoweringPlugin(decomposition), "b": LoweringPlugin(decomposition)})
    with pytest.raises(
        ModelcError, match="decomposition 'toy_op' is registered twice: by plugin 'a' and by plugin 'b'"
    ):
        _ = twice.registry
    sloppy = Host.with_plugins({"sloppy": LoweringPlugin("not an entry")})
    with pytest.raises(ModelcError, match="plugin 'sloppy': register_lowerings was given str, not a Lowering"):
        _ = sloppy.registry


def chain_graph():
    """x -> add(x, x) -> relu -> out, and a second reader of the add's output when asked."""
    g = GraphBuilder("chain")
    s = g.add("add", ["x", "x"], name="sum")
    y = g.add("relu", [s], name="act")
    return g.build(["x"], [y], attrs={"dtype": "float32"})


def test_missing_lowering_names_node_op_and_backend():
    graph = chain_graph()
    table = LoweringTable([Lowering("add", "toy", relu_kernel)])
    with pytest.raises(ModelcError, match="node act: no plugin lowers op 'relu' for the toy backend"):
        plan_lowering(graph.nodes, graph, "toy", table)


def test_fused_pattern_folds_its_producer_only_when_nothing_else_reads_it():
    doubled_relu = FusedPattern(
        "relu_of_sum", "toy", Pattern("relu", (Pattern("add"),)), lambda match, low: ("fused", match.inputs)
    )
    table = LoweringTable([Lowering("add", "toy", relu_kernel), Lowering("relu", "toy", relu_kernel), doubled_relu])
    graph = chain_graph()
    (step,) = plan_lowering(graph.nodes, graph, "toy", table)
    assert step.fused is doubled_relu and [n.name for n in step.nodes] == ["sum", "act"]
    assert step.inputs == ("x",) and step.outputs == graph.outputs and step.lower(None) == ("fused", ("x",))
    # The sum is also a graph output: folding it would lose it, so both nodes are lowered alone.
    kept = graph.replace(outputs=(*graph.outputs, "sum.out"))
    assert [s.fused for s in plan_lowering(kept.nodes, kept, "toy", table)] == [None, None]


def test_decomposition_is_used_only_where_the_backend_has_no_lowering_and_cycles_are_named():
    def as_add_then_relu(node, graph):
        (x,) = node.inputs
        return [
            Node(f"{node.name}.sum", "add", (x, x), (f"{node.name}.s",)),
            Node(node.name, "relu", (f"{node.name}.s",), node.outputs),
        ]

    g = GraphBuilder("toy")
    y = g.add("double_relu", ["x"], name="dr")
    graph = g.build(["x"], [y], attrs={"dtype": "float32"})
    base = [
        Lowering("add", "toy", relu_kernel),
        Lowering("relu", "toy", relu_kernel),
        Decomposition("double_relu", as_add_then_relu),
    ]
    steps = plan_lowering(graph.nodes, graph, "toy", LoweringTable(base))
    assert [s.root.name for s in steps] == ["dr.sum", "dr"] and steps[-1].outputs == ("dr.out",)
    own = LoweringTable([*base, Lowering("double_relu", "toy", relu_kernel)])
    assert [s.root.name for s in plan_lowering(graph.nodes, graph, "toy", own)] == ["dr"]
    looping = LoweringTable([Decomposition("double_relu", lambda node, graph: [node])])
    with pytest.raises(
        ModelcError, match="node dr: op 'double_relu' decomposes more than 8 levels deep for the toy backend"
    ):
        plan_lowering(graph.nodes, graph, "toy", looping)


def test_a_fused_pattern_matches_across_the_edge_of_a_decomposed_op():
    """A composite op's last part and the op that reads it fuse (as an INT4 linear's GEMM and the
    GELU after it do); a composite op that roots a pattern itself is taken whole, and where that
    pattern does not match it is still decomposed."""

    def as_sum(node, graph):
        (x,) = node.inputs
        return [Node(node.name, "add", (x, x), node.outputs)]

    g = GraphBuilder("toy")
    doubled = g.add("double", ["x"], name="twice")
    y = g.add("relu", [doubled], name="act")
    graph = g.build(["x"], [y], attrs={"dtype": "float32"})
    relu_of_sum = FusedPattern(
        "relu_of_sum", "toy", Pattern("relu", (Pattern("add"),)), lambda match, low: ("fused", match.inputs)
    )
    base = [Lowering("add", "toy", relu_kernel), Lowering("relu", "toy", relu_kernel), Decomposition("double", as_sum)]
    (step,) = plan_lowering(graph.nodes, graph, "toy", LoweringTable([*base, relu_of_sum]))
    assert step.fused is relu_of_sum and [n.name for n in step.nodes] == ["twice", "act"]
    assert step.inputs == ("x",) and step.outputs == graph.outputs

    whole = FusedPattern("double", "toy", Pattern("double"), lambda match, low: "whole")
    steps = plan_lowering(graph.nodes, graph, "toy", LoweringTable([*base, relu_of_sum, whole]))
    assert [(s.root.name, s.fused) for s in steps] == [("twice", whole), ("act", None)]
    picky = FusedPattern("double", "toy", Pattern("double", where=lambda node: False), lambda match, low: "whole")
    steps = plan_lowering(graph.nodes, graph, "toy", LoweringTable([*base, picky]))
    assert [(s.root.name, s.root.op, s.fused) for s in steps] == [("twice", "add", None), ("act", "relu", None)]


def test_executor_receives_its_table_and_a_plugin_op_declared_by_decomposition_runs():
    """An op with no torch code: it decomposes into core primitives (per-channel int8 weight)."""

    def decompose(node, graph):
        n = node.name
        weight = Node(
            f"{n}.w",
            "dequantize",
            (),
            (f"{n}.wd",),
            {"quantized": node.params["weight"], "scale": node.params["scale"]},
            {"dtype": "int8", "axis": 0},
        )
        return [weight, Node(n, "matmul", (node.inputs[0], f"{n}.wd"), node.outputs)]

    class Int8Weights:
        @hookimpl
        def register_ops(self, register):
            register(OpSpec("toy_int8_linear", "x @ (weight * scale[:, None]).T", params=("weight", "scale")))

        @hookimpl
        def register_lowerings(self, register):
            register(Decomposition("toy_int8_linear", decompose))

    g = GraphBuilder("toy")
    w, s = g.param("fc.weight", [3, 4], "int8"), g.param("fc.scale", [3], "float32")
    y = g.add("toy_int8_linear", ["x"], name="fc", params={"weight": w, "scale": s})
    graph = g.build(["x"], [y], attrs={"dtype": "float32"})
    weights = {
        "fc.weight": torch.tensor([[1, -2, 3, 127], [0, 5, -128, 7], [9, 9, 9, 9]], dtype=torch.int8),
        "fc.scale": torch.tensor([0.5, 0.25, 2.0]),
    }
    x = torch.randn(1, 2, 4)
    ctx = ForwardContext.for_prompt(torch.ones(1, 2, dtype=torch.long))
    want = x @ (weights["fc.weight"].float() * weights["fc.scale"][:, None]).T
    registry = Host.with_plugins({"toy_int8": Int8Weights()}).registry
    table = registry.lowerings
    (got,) = GraphExecutor(registry, graph, weights, lowerings=table).run({"x": x}, ctx).values()
    torch.testing.assert_close(got, want)
    unfused = LoweringTable([e for e in table.entries() if not isinstance(e, FusedPattern)])
    executor = GraphExecutor(registry, graph, weights, lowerings=unfused)
    assert [s.root.op for s in executor.steps] == ["dequantize", "matmul"]
    torch.testing.assert_close(executor.run({"x": x}, ctx)["fc.out"], want)


def test_modelc_plugins_lists_lowerings_decompositions_and_fused_patterns():
    done = run_modelc("plugins", "--json")
    assert done.returncode == 0, done.stderr
    info = {p["name"]: p for p in json.loads(done.stdout)}
    core = info["core"]["provides"]
    assert {"torch:linear", "torch:quantize", "torch:dequantize", "torch:matmul"} <= set(core["lowerings"])
    assert {"torch:fp8_gemm", "torch:int4_gemm", "torch:dequantized_gemm"} <= set(core["fused_patterns"])
    assert "register_lowerings" in info["core"]["hooks"]
    onnx = info["onnx"]["provides"]
    assert {"onnx:linear", "onnx:quantize", "onnx:dequantize"} <= set(onnx["lowerings"])
    assert onnx["fused_patterns"] == ["onnx:dequantized_matmul"]
    assert info["quant_fp8"]["provides"]["decompositions"] == ["fp8_linear"]
    assert info["quant_awq"]["provides"]["decompositions"] == ["awq_linear"]
    # A scheme declared by decomposition registers no backend code at all.
    assert "lowerings" not in info["quant_fp8"]["provides"] and "lowerings" not in info["quant_awq"]["provides"]
    text = run_modelc("plugins")
    assert (
        "    decompositions: fp8_linear" in text.stdout and "    fused patterns: onnx:dequantized_matmul" in text.stdout
    )
