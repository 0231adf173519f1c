"""Where AWQ scales go, decided from the graph and the architecture's scale groups."""

from __future__ import annotations

import pytest

from compiler_core.api import ScaleGroup
from compiler_core.errors import ModelcError
from compiler_core.ir import GraphBuilder
from modelc_plugins.quant_awq.calibrate import feeds_attention, plan_scales
from modelc_plugins.quant_awq.transform import output_heads


def small_graph():
    """ln1 -> {a, b}; ln2 -> {c} and a residual add; gelu(a) -> d; lm_head (then a narrow) is the output."""
    g = GraphBuilder("t")

    def linear(name: str, x: str, out: int, inp: int) -> str:
        return g.add("linear", [x], name=name, params={"weight": g.param(f"{name}.weight", [out, inp], "float32")})

    def norm(name: str, x: str) -> str:
        w, b = g.param(f"{name}.weight", [8], "float32"), g.param(f"{name}.bias", [8], "float32")
        return g.add("layer_norm", [x], name=name, params={"weight": w, "bias": b}, eps=1e-5)

    ln1 = norm("ln1", "x")
    a, b = linear("a", ln1, 16, 8), linear("b", ln1, 8, 8)
    ln2 = norm("ln2", b)
    c = linear("c", ln2, 8, 8)
    res = g.add("add", [ln2, c], name="res")
    d = linear("d", g.add("gelu", [a], name="act"), 8, 16)
    head = g.add(
        "narrow",
        [linear("lm_head", g.add("add", [res, d], name="sum"), 8, 8)],
        name="unpad",
        axis=-1,
        start=0,
        length=6,
    )
    return g.build(["x"], [head])


def test_norms_fold_only_when_their_group_alone_reads_them() -> None:
    graph = small_graph()
    groups = [ScaleGroup("ln1", ("a", "b")), ScaleGroup("ln2", ("c",)), ScaleGroup("act", ("d",))]
    plans = plan_scales(graph, groups, quantized={"a", "c", "d"})
    summary = [(p.producer.name, [n.name for n in p.linears], p.fold) for p in plans]
    assert summary == [
        ("ln1", ["a", "b"], True),  # b is excluded from quantization but still gets W * s
        ("ln2", ["c"], False),  # the residual add also reads ln2's output: keep the scale as prequant
        ("act", ["d"], False),  # a GELU cannot absorb a scale
    ]
    assert plan_scales(graph, [ScaleGroup("ln1", ("b",))], quantized={"a"}) == []


def test_bad_scale_groups_name_the_layer() -> None:
    graph = small_graph()
    with pytest.raises(ModelcError, match="'d' is not a linear reading the output of ln1"):
        plan_scales(graph, [ScaleGroup("ln1", ("a", "d"))], {"a", "d"})
    with pytest.raises(ModelcError, match="producer 'nope'"):
        plan_scales(graph, [ScaleGroup("nope", ("a",))], {"a"})
    with pytest.raises(ModelcError, match="'a' is in more than one group"):
        plan_scales(graph, [ScaleGroup("ln1", ("a",)), ScaleGroup("ln1", ("a",))], {"a"})


def test_output_head_and_attention_inputs_are_found_structurally() -> None:
    graph = small_graph()
    assert output_heads(graph) == ["lm_head"]
    assert not any(feeds_attention(graph, n) for n in graph.nodes_of("linear"))
