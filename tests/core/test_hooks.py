"""Every hook, called the way the core calls it: registration results, firstresult order, defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from compiler_core import hookimpl
from compiler_core.backends.torch.kernels import TorchLowering
from compiler_core.convert.from_hf import convert, model_config_from_hf
from compiler_core.ir import Graph, Node, validate
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.plugins import get_plugin_manager
from compiler_core.registry import Backend, QuantScheme, ScaleGroup, get_registry
from compiler_core.runtime.context import ForwardContext
from compiler_core.testing import plugin_registered


def hook():
    return get_plugin_manager().hook


@pytest.fixture(scope="module")
def falcon_config(tiny_falcon) -> dict[str, Any]:
    return model_config_from_hf(tiny_falcon, "float32", Mapping.create(2, 1))


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

    def build_rank(self, graph, weights, out_dir, rank, settings):
        return {}

    def load_rank(self, engine_dir, engine_config, rank, device):
        raise NotImplementedError


class Registrations:
    @hookimpl
    def register_quant_schemes(self, register):
        register(ToyScheme())

    @hookimpl
    def register_backends(self, register):
        register(ToyBackend())


def test_registration_hooks_fill_the_registry_and_record_the_owner():
    with plugin_registered(Registrations(), "toy"):
        registry = get_registry()
        assert isinstance(registry.quant_scheme("toy_int8", "--qformat"), ToyScheme)
        assert isinstance(registry.backend("toy_backend", "--backend"), ToyBackend)
        assert registry.provided_by[("quant_schemes", "toy_int8")] == "toy"
        assert registry.provided_by[("backends", "toy_backend")] == "toy"
        assert registry.provided_by[("backends", "torch")] == "core"
        assert registry.provided_by[("architectures", "falcon")] == "falcon"
        # The core's own default choice skips a backend that says it cannot build here.
        from compiler_core.build.engine import choose_backend

        assert choose_backend(None)[0].name != "toy_backend"
    assert "toy_int8" not in get_registry().quant_schemes


def test_unknown_registered_name_lists_the_known_ones():
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match=r"--backend: unknown backend 'nope' \(known: .*torch"):
        get_registry().backend("nope", "--backend")


# --- map_weight ------------------------------------------------------------------------------


def test_map_weight_is_answered_by_the_owning_architecture(falcon_config):
    w = torch.randn(falcon_config["vocab_size"], falcon_config["hidden_size"])
    mapped = hook().map_weight(config=falcon_config, name="transformer.word_embeddings.weight", tensor=w)
    assert set(mapped) == {"embed.weight", "lm_head.weight"}  # tied embeddings feed both
    assert torch.equal(mapped["embed.weight"], w)
    # Nobody claims another family's tensors: None, which convert turns into an error naming the tensor.
    assert hook().map_weight(config={"architecture": "nobody"}, name="x.weight", tensor=w) is None


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


# --- pipeline_layer_ranges ----------------------------------------------------------------------


class BackHeavyStages:
    """Puts every layer but the first into the last stage; None for configs it does not know."""

    @hookimpl
    def pipeline_layer_ranges(self, config, pp_size):
        if config.get("architecture") != "falcon" or pp_size != 2:
            return None
        n = int(config["num_hidden_layers"])
        return [range(0, 1), range(1, n)]


def test_pipeline_layer_ranges_default_and_override(falcon_config):
    config = {**falcon_config, "num_hidden_layers": 5}
    assert hook().pipeline_layer_ranges(config=config, pp_size=2) == [range(0, 3), range(3, 5)]
    assert hook().pipeline_layer_ranges(config=config, pp_size=3) == [range(0, 2), range(2, 4), range(4, 5)]
    with plugin_registered(BackHeavyStages(), "stages"):
        assert hook().pipeline_layer_ranges(config=config, pp_size=2) == [range(0, 1), range(1, 5)]
        # None from the plugin falls through to the core's default.
        assert hook().pipeline_layer_ranges(config=config, pp_size=3) == [range(0, 2), range(2, 4), range(4, 5)]
        pp2 = {**config, "mapping": Mapping.create(1, 2).to_json()}
        assert rank_graph(pp2, 1).attrs["layers"] == [1, 5]


def test_default_stages_refuse_more_stages_than_layers(falcon_config):
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match="pp_size 3 exceeds the number of layers"):
        hook().pipeline_layer_ranges(config={**falcon_config, "num_hidden_layers": 2}, pp_size=3)


# --- shard_param -----------------------------------------------------------------------------


def test_shard_param_core_default_splits_by_shape(falcon_config):
    mapping = Mapping.create(2, 1)
    graph = rank_graph(falcon_config, 1)
    full_fc = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64)
    part = hook().shard_param(
        name="layers.0.mlp.fc.weight", tensor=full_fc, graph=graph, config=falcon_config, mapping=mapping, rank=1
    )
    assert torch.equal(part, full_fc[128:])  # column parallel: rows split
    full_proj = torch.randn(64, 256)
    part = hook().shard_param(
        name="layers.0.mlp.proj.weight", tensor=full_proj, graph=graph, config=falcon_config, mapping=mapping, rank=1
    )
    assert torch.equal(part, full_proj[:, 128:])  # row parallel: columns split
    ln = torch.randn(64)
    part = hook().shard_param(
        name="layers.0.input_layernorm.weight", tensor=ln, graph=graph, config=falcon_config, mapping=mapping, rank=1
    )
    assert part is ln  # same shape on every rank: replicated


def test_shard_param_pads_an_uneven_vocabulary(falcon_config):
    config = {**falcon_config, "vocab_size": 391, "mapping": Mapping.create(2, 1).to_json()}
    graph = rank_graph(config, 1)
    assert graph.params["lm_head.weight"].shape == (196, 64)
    full = torch.randn(391, 64)
    part = hook().shard_param(
        name="lm_head.weight", tensor=full, graph=graph, config=config, mapping=Mapping.create(2, 1), rank=1
    )
    assert torch.equal(part[:195], full[196:])
    assert torch.equal(part[195], torch.zeros(64))


def test_shard_param_plugin_answer_comes_before_the_default(falcon_config):
    seen = []

    class Override:
        @hookimpl
        def shard_param(self, name, tensor, graph, config, mapping, rank):
            seen.append(name)
            return torch.full(graph.params[name].shape, 7.0) if name.endswith("fc.weight") else None

    graph = rank_graph(falcon_config, 0)
    args = {"graph": graph, "config": falcon_config, "mapping": Mapping.create(2, 1), "rank": 0}
    with plugin_registered(Override(), "override"):
        fc = hook().shard_param(name="layers.0.mlp.fc.weight", tensor=torch.randn(256, 64), **args)
        proj = hook().shard_param(name="layers.0.mlp.proj.weight", tensor=torch.ones(64, 256), **args)
    assert torch.equal(fc, torch.full((128, 64), 7.0))
    assert torch.equal(proj, torch.ones(64, 128))  # the plugin said None: the default split it
    assert seen == ["layers.0.mlp.fc.weight", "layers.0.mlp.proj.weight"]


# --- quantize_layer --------------------------------------------------------------------------


def test_quantize_layer_first_non_none_answer_wins(falcon_config):
    graph = rank_graph({**falcon_config, "mapping": Mapping().to_json()}, 0)
    node = graph.node("layers.0.mlp.fc")
    scheme = ToyScheme()
    calls = []

    class NotMine:
        @hookimpl
        def quantize_layer(self, node, graph, weights, scheme, stats):
            calls.append("not_mine")
            return None

    class Mine:
        @hookimpl
        def quantize_layer(self, node, graph, weights, scheme, stats):
            calls.append("mine")
            if scheme.name != "toy_int8" or node.op != "linear":
                return None
            w = weights[node.params["weight"]]
            scale = w.abs().amax() / 127
            q = (w / scale).round().to(torch.int8)
            return [node.replace(attrs={**node.attrs})], {node.params["weight"]: q * scale}

    weights = {"layers.0.mlp.fc.weight": torch.randn(256, 64)}
    # Registered later = asked first (pluggy's LIFO), so "not_mine" is asked first here.
    with plugin_registered(Mine(), "mine"), plugin_registered(NotMine(), "not_mine"):
        nodes, tensors = hook().quantize_layer(node=node, graph=graph, weights=weights, scheme=scheme, stats={})
        assert calls == ["not_mine", "mine"]
        assert nodes == [node]
        w = weights["layers.0.mlp.fc.weight"]
        assert (tensors["layers.0.mlp.fc.weight"] - w).abs().max() <= w.abs().max() / 127
        ln = graph.node("layers.0.input_layernorm")
        assert hook().quantize_layer(node=ln, graph=graph, weights={}, scheme=scheme, stats={}) is None


# --- scale_groups ----------------------------------------------------------------------------


def test_scale_groups_from_the_architecture(falcon_config):
    config = {**falcon_config, "mapping": Mapping().to_json()}
    graph = rank_graph(config, 0)
    groups = hook().scale_groups(graph=graph, config=config)
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
    assert hook().scale_groups(graph=graph, config={"architecture": "nobody"}) is None


# --- lower_layer -----------------------------------------------------------------------------


def test_lower_layer_core_kernels_and_plugin_override(falcon_config):
    graph = rank_graph({**falcon_config, "mapping": Mapping().to_json()}, 0)
    weights = {name: torch.randn(p.shape) for name, p in graph.params.items()}
    low = TorchLowering(weights, torch.device("cpu"), graph)
    node = graph.node("layers.0.mlp.fc")
    kernel = hook().lower_layer(node=node, graph=graph, backend="torch", context=low)
    x = torch.randn(1, 3, 64)
    ctx = ForwardContext.for_prompt(torch.ones(1, 3, dtype=torch.long))
    expected = x @ weights["layers.0.mlp.fc.weight"].T + weights["layers.0.mlp.fc.bias"]
    torch.testing.assert_close(kernel(ctx, x), expected)
    assert hook().lower_layer(node=node, graph=graph, backend="no_such_backend", context=None) is None

    class Doubler:
        @hookimpl
        def lower_layer(self, node, graph, backend, context):
            if backend == "torch" and node.op == "gelu":
                return lambda ctx, x: 2 * x
            return None

    act = graph.node("layers.0.mlp.act")
    with plugin_registered(Doubler(), "doubler"):
        assert torch.equal(hook().lower_layer(node=act, graph=graph, backend="torch", context=low)(ctx, x), 2 * x)
        assert hook().lower_layer(node=node, graph=graph, backend="torch", context=low) is not None


def test_executor_names_a_node_nobody_lowers():
    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.errors import ModelcError
    from compiler_core.ir import OpSpec

    class Orphan:
        @hookimpl
        def register_ops(self, register):
            register(OpSpec("orphan", "an op without a kernel"))

    graph = Graph("g", ("x",), ("n.out",), (Node("n", "orphan", ("x",), ("n.out",)),), {})
    with plugin_registered(Orphan(), "orphan"):
        validate(graph, get_registry().ops)
        with pytest.raises(ModelcError, match="node n: no plugin lowers op 'orphan' for the torch backend"):
            GraphExecutor(graph, {})


# --- the real pipeline calls the dispatch hooks ------------------------------------------------


def test_convert_and_run_go_through_the_dispatch_hooks(tiny_falcon, tmp_path: Path):
    """Monitor the live plugin manager: conversion and execution really ask the hooks."""
    from compiler_core.runtime.loading import checkpoint_runner

    called: dict[str, int] = {}

    def before(hook_name, hook_impls, kwargs):
        called[hook_name] = called.get(hook_name, 0) + 1

    undo = get_plugin_manager().add_hookcall_monitoring(before, lambda *a: None)
    try:
        convert(tiny_falcon, tmp_path / "ck", dtype="float32", mapping=Mapping.create(1, 2), show_progress=False)
        runner = checkpoint_runner(tmp_path / "ck")
        runner.allocate(1, 4)
        mask = torch.ones(1, 3, dtype=torch.long)
        runner.logits(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], mask, 0)
    finally:
        undo()
    assert {"map_weight", "shard_param", "pipeline_layer_ranges", "lower_layer"} <= set(called)
    # One lowering per node of each rank's graph, the only way the executor gets a kernel.
    assert called["lower_layer"] == sum(len(s.graph.nodes) for s in runner.sessions)
