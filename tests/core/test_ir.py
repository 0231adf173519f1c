"""The IR: one validator rejecting each kind of malformed graph, JSON round trip, printer, passes."""

from __future__ import annotations

import json

import pytest
import torch

from compiler_core.ir import CORE_OPS, DTYPES, Graph, GraphBuilder, GraphError, Node, Param, format_graph, validate
from compiler_core.ir.passes import drop_unused_params, run_passes

OPS = {spec.name: spec for spec in CORE_OPS}


def small_graph() -> Graph:
    """embed -> layer_norm -> linear(column) -> gelu -> linear(row) -> add residual."""
    g = GraphBuilder("small")
    e = g.add("embedding", ["input_ids"], name="embed", params={"weight": g.param("embed.weight", [16, 8], "float32")})
    n = g.add(
        "layer_norm",
        [e],
        name="ln",
        params={"weight": g.param("ln.weight", [8], "float32"), "bias": g.param("ln.bias", [8], "float32")},
        eps=1e-5,
    )
    h = g.add("linear", [n], name="fc", params={"weight": g.param("fc.weight", [32, 8], "float32")}, parallel="column")
    h = g.add("gelu", [h], name="act", approximate="tanh")
    h = g.add("linear", [h], name="proj", params={"weight": g.param("proj.weight", [8, 32], "float32")})
    out = g.add("add", [e, h], name="residual")
    return g.build(["input_ids"], [out], attrs={"dtype": "float32", "layers": [0, 1]})


def replace_node(graph: Graph, node_name: str, **changes) -> Graph:
    return graph.replace(nodes=tuple(n.replace(**changes) if n.name == node_name else n for n in graph.nodes))


def test_small_graph_is_valid():
    graph = small_graph()
    assert validate(graph, OPS) is graph


# Each case breaks one rule; the message must name the node / value / parameter at fault.
MALFORMED = {
    "unknown op": (lambda g: replace_node(g, "act", op="swish"), ["node act", "'swish'", "unknown op"]),
    "too many inputs": (
        lambda g: replace_node(g, "act", inputs=("fc.out", "ln.out")),
        ["node act", "takes 1 inputs, got 2"],
    ),
    "too few inputs": (
        lambda g: replace_node(g, "residual", inputs=("embed.out",)),
        ["node residual", "takes 2 inputs"],
    ),
    "wrong output count": (
        lambda g: replace_node(g, "act", outputs=("a", "b")),
        ["node act", "makes 1 outputs, got 2"],
    ),
    "undefined input": (
        lambda g: replace_node(g, "proj", inputs=("nowhere",)),
        ["node proj", "'nowhere'", "not a graph input"],
    ),
    "input used before defined": (
        lambda g: replace_node(g, "fc", inputs=("act.out",)),
        ["node fc", "'act.out'", "not a graph input or an earlier node's output"],
    ),
    "redefined output": (
        lambda g: replace_node(g, "act", outputs=("ln.out",)),
        ["node act", "'ln.out'", "already defined"],
    ),
    "output shadows graph input": (
        lambda g: replace_node(g, "act", outputs=("input_ids",)),
        ["node act", "'input_ids'", "already defined"],
    ),
    "duplicate node name": (lambda g: replace_node(g, "act", name="fc"), ["node fc", "earlier node"]),
    "missing param role": (lambda g: replace_node(g, "fc", params={}), ["node fc", "missing parameter role 'weight'"]),
    "unexpected param role": (
        lambda g: replace_node(g, "act", params={"weight": "fc.weight"}),
        ["node act", "unexpected parameter role 'weight'"],
    ),
    "missing attr": (lambda g: replace_node(g, "ln", attrs={}), ["node ln", "missing attribute 'eps'"]),
    "unexpected attr": (
        lambda g: replace_node(g, "residual", attrs={"alpha": 2.0}),
        ["node residual", "unexpected attribute 'alpha'"],
    ),
    "attr not storable as JSON": (
        lambda g: replace_node(g, "ln", attrs={"eps": torch.tensor(1e-5)}),
        ["node ln", "attribute 'eps'", "JSON"],
    ),
    "undeclared param": (
        lambda g: replace_node(g, "proj", params={"weight": "proj.weight", "bias": "proj.bias"}),
        ["node proj", "'proj.bias'", "not declared"],
    ),
    "unused param": (
        lambda g: g.replace(params={**g.params, "spare.weight": Param("spare.weight", (4,), "float32")}),
        ["'spare.weight'", "no node reads it"],
    ),
    "param key mismatch": (
        lambda g: g.replace(params={**g.params, "ln.bias": Param("ln.beta", (8,), "float32")}),
        ["'ln.bias'", "'ln.beta'"],
    ),
    "undefined graph output": (lambda g: g.replace(outputs=("logits",)), ["graph small", "'logits'", "never produced"]),
    "bad dtype": (
        lambda g: g.replace(params={**g.params, "fc.weight": Param("fc.weight", (32, 8), "float33")}),
        ["parameter fc.weight", "'float33'"],
    ),
    "non-positive dim": (
        lambda g: g.replace(params={**g.params, "fc.weight": Param("fc.weight", (0, 8), "float32")}),
        ["parameter fc.weight", "[0, 8]"],
    ),
    "non-integer dim": (
        lambda g: g.replace(params={**g.params, "fc.weight": Param("fc.weight", (32.0, 8), "float32")}),
        ["parameter fc.weight", "positive integers"],
    ),
    "graph input listed twice": (lambda g: g.replace(inputs=("input_ids", "input_ids")), ["'input_ids'", "twice"]),
    "graph attr not storable": (lambda g: g.replace(attrs={"dtype": torch.float32}), ["graph small", "'dtype'"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_validator_rejects_malformed_graph(case):
    breaker, fragments = MALFORMED[case]
    graph = breaker(small_graph())
    with pytest.raises(GraphError) as info:
        validate(graph, OPS)
    for fragment in fragments:
        assert fragment in str(info.value), f"{case}: {fragment!r} not in {info.value}"


def test_validator_knows_only_registered_ops():
    """An op is valid only once some plugin registered it: the validator takes the table as input."""
    graph = small_graph()
    without_gelu = {k: v for k, v in OPS.items() if k != "gelu"}
    with pytest.raises(GraphError, match=r"node act.*unknown op 'gelu'"):
        validate(graph, without_gelu)


def test_optional_param_and_attr_are_accepted():
    graph = replace_node(small_graph(), "fc", attrs={})  # `parallel` is optional
    graph = replace_node(graph, "ln", params={"weight": "ln.weight"})  # bias is optional
    graph = drop_unused_params(graph)
    assert "ln.bias" not in graph.params
    validate(graph, OPS)


def test_every_core_dtype_is_accepted():
    for dtype in DTYPES:
        g = GraphBuilder("dtypes")
        w = g.param("embed.weight", [4, 2], dtype)
        out = g.add("embedding", ["ids"], name="embed", params={"weight": w})
        validate(g.build(["ids"], [out]), OPS)


def test_builder_refuses_conflicting_redeclaration():
    g = GraphBuilder("b")
    g.param("w", [2, 2], "float32")
    g.param("w", [2, 2], "float32")  # same declaration twice is fine (shared weights)
    with pytest.raises(ValueError, match="parameter w declared twice"):
        g.param("w", [2, 3], "float32")


def test_json_round_trip_small_graph():
    graph = small_graph()
    text = graph.dumps()
    back = Graph.from_json(json.loads(text))
    assert back == graph
    assert back.dumps() == text


def test_json_refuses_other_ir_versions_and_missing_fields():
    data = small_graph().to_json()
    with pytest.raises(ValueError, match="IR version 99"):
        Graph.from_json({**data, "ir_version": 99})
    broken = {k: v for k, v in data.items() if k != "nodes"}
    with pytest.raises(ValueError, match="field 'nodes' is missing"):
        Graph.from_json(broken)


def _falcon_config(registry, hf_dir, tp: int, pp: int) -> dict:
    from compiler_core.convert.from_hf import model_config_from_hf
    from compiler_core.mapping import Mapping

    return model_config_from_hf(registry, hf_dir, "float32", Mapping.create(tp, pp))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_json_round_trip_of_real_falcon_rank_graphs(registry, tiny_falcon_7b, tp, pp):
    """Every rank graph the Falcon plugin builds survives JSON exactly and validates after reading."""
    from compiler_core.model import rank_graph

    config = _falcon_config(registry, tiny_falcon_7b, tp, pp)
    for rank in range(tp * pp):
        graph = rank_graph(registry, config, rank)
        back = Graph.from_json(json.loads(json.dumps(graph.to_json())))
        assert back == graph
        validate(back, registry.ops)
        assert back.attrs["rank"] == rank
    assert any(n.op == "all_reduce" for n in graph.nodes) == (tp > 1)


def test_printer_lists_ops_params_and_values(registry, tiny_falcon):
    from compiler_core.model import rank_graph

    graph = rank_graph(registry, _falcon_config(registry, tiny_falcon, 1, 1), 0)
    text = format_graph(graph)
    first = text.splitlines()[0]
    assert first.startswith(f"graph {graph.name}: {len(graph.nodes)} nodes, {len(graph.params)} params")
    total = sum(p.numel for p in graph.params.values())
    assert f"({total:,} elements)" in first
    for op in {n.op for n in graph.nodes}:
        assert f"{op}×" in text
        assert f" = {op}(" in text
    # Every node line names its node, its parameters with dtype and shape, and its attributes.
    qkv = graph.node("layers.0.attention.qkv")
    weight = graph.params[qkv.params["weight"]]
    line = next(line for line in text.splitlines() if line.endswith("# layers.0.attention.qkv"))
    assert f"weight=float32{list(weight.shape)}" in line
    assert "parallel=column" in line
    assert "alibi_num_heads=4" in text
    short = format_graph(graph, max_nodes=3)
    assert f"... {len(graph.nodes) - 3} more nodes" in short
    assert short.count(" = ") == 3


def test_run_passes_names_the_pass_that_broke_the_graph():
    def break_it(graph: Graph) -> Graph:
        return graph.replace(outputs=("gone",))

    def check(graph: Graph) -> Graph:
        return validate(graph, OPS)

    graph = small_graph()
    assert run_passes(graph, [("noop", lambda g: g)], check=check) == graph
    with pytest.raises(ValueError, match=r"after pass 'break_it'.*'gone'"):
        run_passes(graph, [("noop", lambda g: g), ("break_it", break_it)], check=check)


def test_node_and_graph_are_immutable():
    graph = small_graph()
    with pytest.raises(AttributeError):
        graph.name = "x"  # type: ignore[misc]
    node = graph.nodes[0]
    assert isinstance(node, Node)
    with pytest.raises(AttributeError):
        node.op = "x"  # type: ignore[misc]
