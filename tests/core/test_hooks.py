"""Every hook and every per-family or per-scheme method, called the way the core calls them:
registration results, the lowering table, and the base classes' defaults."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compiler_core import hookimpl
from compiler_core.api import Architecture, Backend, QuantScheme, ScaleGroup
from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.convert.from_hf import convert, model_config_from_hf
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.host import Host
from compiler_core.ir import Graph, GraphBuilder, Node, validate
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.quantize.ptq import quantize_layers
from compiler_core.runtime.context import ForwardContext


@pytest.fixture(scope="module")
def falcon_config(registry, tiny_falcon) -> CheckpointConfig:
    return model_config_from_hf(registry, tiny_falcon, "float32", Mapping.create(2, 1))


@pytest.fixture(scope="module")
def falcon(registry) -> Architecture:
    return registry.architecture("falcon", "test")


# --- registration hooks -------------------------------------------------------------------


class ToyScheme(QuantScheme):
    name = "toy_int8"
    quant_algo = "TOY_INT8"

    def quantize(self, model, calibration, options):
        return model


class ToyBackend(Backend):
    name = "toy_backend"

    def unavailable_reason(self) -> str | None:
        return "toy backends never build"

    def build_rank(self, graph, weights, out_dir, rank, settings, registry):
        return {}

    def load_rank(self, engine_dir, engine_config, rank, device, registry):
        raise NotImplementedError


class Registrations:
    @hookimpl
    def register_quant_schemes(self, register):
        register(ToyScheme())

    @hookimpl
    def register_backends(self, register):
        register(ToyBackend())


def test_registration_hooks_fill_the_registry_and_record_the_owner():
    registry = Host.load(extra={"toy": Registrations()}).registry
    assert isinstance(registry.quant_scheme("toy_int8", "--qformat"), ToyScheme)
    assert isinstance(registry.backend("toy_backend", "--backend"), ToyBackend)
    assert registry.provided_by[("quant_schemes", "toy_int8")] == "toy"
    assert registry.provided_by[("backends", "toy_backend")] == "toy"
    assert registry.provided_by[("backends", "torch")] == "core"
    assert registry.provided_by[("architectures", "falcon")] == "falcon"
    # The core's own default choice skips a backend that says it cannot build here.
    from compiler_core.build.engine import choose_backend

    assert choose_backend(None, registry)[0].name != "toy_backend"
    # The plugin lives in that host only: another host loads what is installed.
    assert "toy_int8" not in Host.load().registry.quant_schemes


def test_unknown_registered_name_lists_the_known_ones(registry):
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match=r"--backend: unknown backend 'nope' \(known: .*torch"):
        registry.backend("nope", "--backend")


# --- Architecture.map_weight -------------------------------------------------------------------


def test_map_weight_is_answered_by_the_architecture(falcon, falcon_config):
    w = torch.randn(falcon_config.model["vocab_size"], falcon_config.model["hidden_size"])
    mapped = falcon.map_weight(falcon_config.model, "transformer.word_embeddings.weight", w)
    assert set(mapped) == {"embed.weight", "lm_head.weight"}  # tied embeddings feed both
    assert torch.equal(mapped["embed.weight"], w)


def test_map_weight_default_knows_no_tensor():
    """The base class maps nothing: None, which convert turns into an error naming the tensor."""

    class Bare(Architecture):
        name = "bare"

        def detect(self, hf_config):
            return False

        def config_from_hf(self, hf_config):
            return {}

        def build_graph(self, config, mapping, rank, dtype, layers):
            raise NotImplementedError

    assert Bare().map_weight({}, "x.weight", torch.zeros(1)) is None
    assert Bare().scale_groups(Graph("g", (), (), (), {}), {}) is None  # None: the core derives them


def test_unmapped_tensor_is_an_error_naming_it(tiny_falcon, tmp_path):
    from safetensors.torch import save_file

    from compiler_core.errors import UsageError

    hf = tmp_path / "hf"
    hf.mkdir()
    for f in tiny_falcon.iterdir():
        if f.name != "model.safetensors.index.json":
            os.link(f, hf / f.name)  # a shard symlinked out of its model dir is refused
    save_file({"transformer.mystery.weight": torch.zeros(2)}, str(hf / "zz-extra.safetensors"))
    index = json.loads((tiny_falcon / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.mystery.weight"] = "zz-extra.safetensors"  # the index decides what is read
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"zz-extra\.safetensors: tensor 'transformer\.mystery\.weight' is not mapped"):
        convert(hf, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("by_shard", [False, True], ids=["loaded", "by_shard"])
def test_mapped_tensor_no_graph_uses_is_an_error_naming_it(tiny_falcon_7b, tmp_path, by_shard):
    """Falcon-7B has no biases: a stored attention bias maps to a name its graph never reads."""
    from safetensors.torch import save_file

    from compiler_core.errors import UsageError

    hf = tmp_path / "hf"
    hf.mkdir()
    for f in tiny_falcon_7b.iterdir():
        if f.name != "model.safetensors.index.json":
            os.link(f, hf / f.name)  # a shard symlinked out of its model dir is refused
    save_file({"transformer.h.0.self_attention.dense.bias": torch.zeros(64)}, str(hf / "zz-extra.safetensors"))
    index = json.loads((tiny_falcon_7b / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.h.0.self_attention.dense.bias"] = "zz-extra.safetensors"  # the index decides
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        UsageError,
        match=r"zz-extra\.safetensors: tensor 'transformer\.h\.0\.self_attention\.dense\.bias' maps to "
        r"layers\.0\.attention\.dense\.bias, which no graph parameter of architecture 'falcon' uses",
    ):
        convert(hf, tmp_path / "out", mapping=Mapping.create(1, 2), load_by_shard=by_shard, show_progress=False)
    assert not (tmp_path / "out").exists()


# --- Architecture.pipeline_layer_ranges ----------------------------------------------------------


def back_heavy_falcon() -> Architecture:
    """A Falcon that puts every layer but the first into the last of two stages."""
    from modelc_plugins.falcon import Falcon

    class BackHeavyFalcon(Falcon):
        name = "falcon_back_heavy"

        def pipeline_layer_ranges(self, config, pp_size):
            if pp_size != 2:
                return super().pipeline_layer_ranges(config, pp_size)
            return [range(0, 1), range(1, self.num_layers(config))]

    return BackHeavyFalcon()


class RegistersBackHeavy:
    @hookimpl
    def register_architectures(self, register):
        register(back_heavy_falcon())


def test_pipeline_layer_ranges_default_and_override(falcon, falcon_config):
    config = replace(falcon_config, model={**falcon_config.model, "num_hidden_layers": 5})
    assert falcon.pipeline_layer_ranges(config.model, 2) == [range(0, 3), range(3, 5)]
    assert falcon.pipeline_layer_ranges(config.model, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    heavy = back_heavy_falcon()
    assert heavy.pipeline_layer_ranges(config.model, 2) == [range(0, 1), range(1, 5)]
    assert heavy.pipeline_layer_ranges(config.model, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    # The core asks the architecture a config names and hands build_graph that stage's layers.
    registry = Host.load(extra={"stages": RegistersBackHeavy()}).registry
    pp2 = replace(config, architecture="falcon_back_heavy", mapping=Mapping.create(1, 2))
    assert rank_graph(registry, pp2, 1).attrs["layers"] == [1, 5]
    assert rank_graph(registry, replace(pp2, architecture="falcon"), 1).attrs["layers"] == [3, 5]


def test_default_stages_refuse_more_stages_than_layers(falcon, falcon_config):
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match="pp_size 3 exceeds the number of layers"):
        falcon.pipeline_layer_ranges({**falcon_config.model, "num_hidden_layers": 2}, 3)


# --- Architecture.shard_param ------------------------------------------------------------------


def test_shard_param_core_default_splits_by_shape(registry, falcon, falcon_config):
    mapping = Mapping.create(2, 1)
    graph = rank_graph(registry, falcon_config, 1)
    full_fc = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64)
    part = falcon.shard_param("layers.0.mlp.fc.weight", full_fc, graph, falcon_config.model, mapping, 1)
    assert torch.equal(part, full_fc[128:])  # column parallel: rows split
    full_proj = torch.randn(64, 256)
    part = falcon.shard_param("layers.0.mlp.proj.weight", full_proj, graph, falcon_config.model, mapping, 1)
    assert torch.equal(part, full_proj[:, 128:])  # row parallel: columns split
    ln = torch.randn(64)
    part = falcon.shard_param("layers.0.input_layernorm.weight", ln, graph, falcon_config.model, mapping, 1)
    assert part is ln  # same shape on every rank: replicated


def test_shard_param_pads_an_uneven_vocabulary(registry, falcon, falcon_config):
    config = replace(falcon_config, model={**falcon_config.model, "vocab_size": 391}, mapping=Mapping.create(2, 1))
    graph = rank_graph(registry, config, 1)
    assert graph.params["lm_head.weight"].shape == (196, 64)
    full = torch.randn(391, 64)
    part = falcon.shard_param("lm_head.weight", full, graph, config.model, Mapping.create(2, 1), 1)
    assert torch.equal(part[:195], full[196:])
    assert torch.equal(part[195], torch.zeros(64))


def _one_linear_graph(registry, rows: int, padded: list[str]) -> Graph:
    g = GraphBuilder("split")
    w = g.param("k_proj.weight", [rows, 8], "float32")
    out = g.add("linear", ["x"], name="k_proj", params={"weight": w}, parallel="column")
    return validate(g.build(["x"], [out], attrs={"padded_params": padded}), registry.ops)


def test_shard_param_refuses_to_pad_an_undeclared_parameter(registry, falcon):
    """Six rows split four ways needs two rows of zeros: allowed only where the graph declares it."""
    mapping = Mapping.create(4, 1)
    full = torch.randn(6, 8)
    graph = _one_linear_graph(registry, 2, padded=[])
    with pytest.raises(ValueError, match=r"parameter k_proj\.weight: 4 chunks of 2 overrun axis 0 of \[6, 8\]"):
        Architecture.shard_param(falcon, "k_proj.weight", full, graph, {}, mapping, 3)
    declared = _one_linear_graph(registry, 2, padded=["k_proj.weight"])
    part = Architecture.shard_param(falcon, "k_proj.weight", full, declared, {}, mapping, 3)
    assert torch.equal(part, torch.zeros(2, 8))


def test_falcon_reorders_the_fused_qkv_and_leaves_the_rest_to_the_default(registry, falcon, falcon_config):
    """Falcon's override answers for its fused QKV only; every other parameter takes the base split."""
    from modelc_plugins.falcon.convert import rank_qkv

    mapping = Mapping.create(2, 1)
    graph = rank_graph(registry, falcon_config, 1)
    model = falcon_config.model
    heads, kv, head_dim = (model[k] for k in ("num_attention_heads", "num_kv_heads", "head_dim"))
    qkv = torch.randn((heads + 2 * kv) * head_dim, model["hidden_size"])
    part = falcon.shard_param("layers.0.attention.qkv.weight", qkv, graph, model, mapping, 1)
    assert torch.equal(part, rank_qkv(qkv, heads, kv, head_dim, 2, 1))
    proj = torch.randn(64, 256)
    base = Architecture.shard_param(falcon, "layers.0.mlp.proj.weight", proj, graph, model, mapping, 1)
    assert torch.equal(falcon.shard_param("layers.0.mlp.proj.weight", proj, graph, model, mapping, 1), base)


# --- QuantScheme.quantize_layer ------------------------------------------------------------------


class ToyInt8(ToyScheme):
    """Quantizes linears to int8 values (kept as float, so graphs keep their dtypes)."""

    def quantize_layer(self, node, graph, weights, stats):
        if node.op != "linear":
            return None
        w = weights[node.params["weight"]]
        scale = w.abs().amax() / 127
        return [node], {node.params["weight"]: (w / scale).round() * scale}


def test_quantize_layers_asks_the_scheme_for_each_node(registry, falcon_config):
    from compiler_core.convert.from_hf import LoadedModel

    graph = rank_graph(registry, replace(falcon_config, mapping=Mapping()), 0)
    weights = {name: torch.randn(p.shape) for name, p in graph.params.items()}
    model = LoadedModel(falcon_config, dict(weights))
    stats = {"layers.0.mlp.fc": {}, "layers.0.input_layernorm": {}}
    out = quantize_layers(registry, model, graph, ToyInt8(), stats, show_progress=False)
    assert out.nodes == graph.nodes
    w, q = weights["layers.0.mlp.fc.weight"], model.weights["layers.0.mlp.fc.weight"]
    assert not torch.equal(q, w) and (q - w).abs().max() <= w.abs().max() / 127
    assert torch.equal(model.weights["layers.0.input_layernorm.weight"], weights["layers.0.input_layernorm.weight"])
    assert torch.equal(model.weights["layers.1.mlp.fc.weight"], weights["layers.1.mlp.fc.weight"])  # no stats
    # The base class quantizes nothing: every node stays as it is.
    assert ToyScheme().quantize_layer(graph.node("layers.0.mlp.fc"), graph, weights, {}) is None


# --- Architecture.scale_groups -------------------------------------------------------------------


def test_scale_groups_from_the_architecture(registry, falcon, falcon_config):
    graph = rank_graph(registry, replace(falcon_config, mapping=Mapping()), 0)
    groups = falcon.scale_groups(graph, falcon_config.model)
    assert all(isinstance(g, ScaleGroup) for g in groups)
    by_producer = {g.producer: g.linears for g in groups}
    # Falcon-RW is sequential: ln -> qkv, post ln -> fc, activation -> proj, in every layer.
    for i in range(2):
        assert by_producer[f"layers.{i}.input_layernorm"] == (f"layers.{i}.attention.qkv",)
        assert by_producer[f"layers.{i}.post_layernorm"] == (f"layers.{i}.mlp.fc",)
        assert by_producer[f"layers.{i}.mlp.act"] == (f"layers.{i}.mlp.proj",)
    for g in groups:  # every named node exists and every linear reads the producer's output
        producer = graph.node(g.producer)
        for linear in g.linears:
            assert graph.node(linear).inputs[0] in producer.outputs


def test_scale_groups_derived_from_the_graph_are_what_falcon_names(registry, falcon, falcon_config):
    """The core's derivation (for architectures that name none) finds Falcon's own groups, plus
    ln_f -> lm_head, which Falcon leaves out and AWQ skips anyway (lm_head is not quantized)."""
    from compiler_core.quantize.scale_groups import derive_scale_groups

    graph = rank_graph(registry, replace(falcon_config, mapping=Mapping()), 0)
    derived = derive_scale_groups(graph, registry.ops)
    assert [g for g in derived if g.producer != "ln_f"] == falcon.scale_groups(graph, falcon_config.model)
    assert ScaleGroup("ln_f", ("lm_head",)) in derived


# --- register_lowerings -----------------------------------------------------------------------


def test_core_lowerings_run_and_a_plugin_fused_pattern_takes_over_one_op(host, falcon_config):
    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.lowering import FusedPattern, Pattern

    graph = rank_graph(host.registry, replace(falcon_config, mapping=Mapping()), 0)
    weights = {name: torch.randn(p.shape) for name, p in graph.params.items()}
    table = host.registry.lowerings
    assert table.lowering("linear", "torch") is not None and table.lowering("linear", "no_such_backend") is None
    low = TorchLowering(weights, torch.device("cpu"), graph)
    node = graph.node("layers.0.mlp.fc")
    kernel = table.lowering("linear", "torch").fn(node, low)
    x = torch.randn(1, 3, 64)
    ctx = ForwardContext.for_prompt(torch.ones(1, 3, dtype=torch.long))
    expected = x @ weights["layers.0.mlp.fc.weight"].T + weights["layers.0.mlp.fc.bias"]
    torch.testing.assert_close(kernel(ctx, x), expected)

    class Doubler:
        @hookimpl
        def register_lowerings(self, register):
            register(FusedPattern("doubled_gelu", "torch", Pattern("gelu"), lambda match, low: lambda ctx, x: 2 * x))

    doubling = Host.load(extra={"doubler": Doubler()}).registry
    executor = GraphExecutor(doubling, graph, weights)
    by_root = {step.root.name: (step, k) for step, k in zip(executor.steps, executor.kernels, strict=True)}
    step, gelu = by_root["layers.0.mlp.act"]
    assert step.fused is not None and step.fused.name == "doubled_gelu"
    assert torch.equal(gelu(ctx, x), 2 * x)
    assert by_root["layers.0.mlp.fc"][0].fused is None
    assert doubling.provided_by[("fused_patterns", "torch:doubled_gelu")] == "doubler"


def test_executor_names_a_node_nobody_lowers():
    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.errors import ModelcError
    from compiler_core.ir import OpSpec

    class Orphan:
        @hookimpl
        def register_ops(self, register):
            register(OpSpec("orphan", "an op without a kernel"))

    graph = Graph("g", ("x",), ("n.out",), (Node("n", "orphan", ("x",), ("n.out",)),), {})
    registry = Host.load(extra={"orphan": Orphan()}).registry
    validate(graph, registry.ops)
    with pytest.raises(ModelcError, match="node n: no plugin lowers op 'orphan' for the torch backend"):
        GraphExecutor(registry, graph, {})


# --- the real pipeline uses the host it is given -------------------------------------------------


def test_convert_and_run_use_the_registry_they_are_given(tiny_falcon, tmp_path: Path):
    """Monitor one host's plugin manager: conversion and execution with its registry ask its hooks,
    and the architecture's methods map and shard every weight."""
    from compiler_core.runtime.loading import checkpoint_runner
    from modelc_plugins.falcon import Falcon

    methods: dict[str, int] = {}

    class CountingFalcon(Falcon):
        def map_weight(self, config, name, tensor):
            methods["map_weight"] = methods.get("map_weight", 0) + 1
            return super().map_weight(config, name, tensor)

        def shard_param(self, name, tensor, graph, config, mapping, rank):
            methods["shard_param"] = methods.get("shard_param", 0) + 1
            return super().shard_param(name, tensor, graph, config, mapping, rank)

    class Counting:
        @hookimpl
        def register_architectures(self, register):
            register(CountingFalcon())

    # The counting Falcon is the only architecture loaded, so it is the one that detects the checkpoint.
    host = Host.with_plugins({"counting": Counting()})
    called: dict[str, int] = {}

    def before(hook_name, hook_impls, kwargs):
        called[hook_name] = called.get(hook_name, 0) + 1

    undo = host.pm.add_hookcall_monitoring(before, lambda *a: None)
    try:
        mapping = Mapping.create(1, 2)
        convert(
            tiny_falcon, tmp_path / "ck", dtype="float32", mapping=mapping, show_progress=False, registry=host.registry
        )
        runner = checkpoint_runner(tmp_path / "ck", registry=host.registry)
        runner.allocate(1, 4)
        mask = torch.ones(1, 3, dtype=torch.long)
        runner.logits(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], mask, 0)
    finally:
        undo()
    params = sum(len(s.graph.params) for s in runner.sessions)
    assert methods["map_weight"] > 0 and methods["shard_param"] == params
    # Every node of each rank's graph is lowered through the registered table, once.
    for session in runner.sessions:
        lowered = [n.name for step in session.executor.steps for n in step.nodes]
        assert lowered == [n.name for n in session.graph.nodes]
