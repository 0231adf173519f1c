"""A new model family is a plugin, not a core change.

This file defines a Llama-style architecture from scratch (RMSNorm, rotary GQA attention,
SwiGLU MLP, untied LM head) as a throwaway plugin object: its architecture (with its weight
mapping as a method) and one op of its own (``concat``, with a torch kernel through
``register_lowerings``), loaded into a host of its own. The core then converts a real Hugging Face
``LlamaForCausalLM`` checkpoint with it, shards it for tensor and pipeline parallelism with the
base class's default rules, and the reference executor's logits match transformers' with a KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from compiler_core import hookimpl
from compiler_core.api import Architecture
from compiler_core.convert.from_hf import convert
from compiler_core.host import Host
from compiler_core.ir import Graph, GraphBuilder, OpSpec
from compiler_core.lowering import Lowering
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.registry import Registry
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.loading import checkpoint_runner

ARCH = "toy_llama"


class ToyLlama(Architecture):
    name = ARCH

    def detect(self, hf_config: dict[str, Any]) -> bool:
        return hf_config.get("model_type") == "llama"

    def config_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        rope = hf.get("rope_parameters") or {}
        return {
            "architecture": ARCH,
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_key_value_heads": hf["num_key_value_heads"],
            "head_dim": hf["hidden_size"] // hf["num_attention_heads"],
            "rms_norm_eps": hf["rms_norm_eps"],
            "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        }

    def check_mapping(self, config: dict[str, Any], mapping: Mapping) -> None:
        if config["num_key_value_heads"] % mapping.tp_size:
            raise ValueError(f"tp_size {mapping.tp_size} must divide num_key_value_heads")

    def map_weight(self, config: dict[str, Any], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name.removeprefix("model."): tensor}

    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
        tp = mapping.tp_size
        hidden, hd, eps = config["hidden_size"], config["head_dim"], config["rms_norm_eps"]
        nh, nkv = config["num_attention_heads"] // tp, config["num_key_value_heads"] // tp
        ffn, vocab = config["intermediate_size"] // tp, config["vocab_size"]
        g = GraphBuilder(f"{ARCH}.rank{rank}")

        def linear(name: str, x: str, out: int, inp: int, parallel: str) -> str:
            w = g.param(f"{name}.weight", [out, inp], dtype)
            return g.add("linear", [x], name=name, params={"weight": w}, parallel=parallel)

        def rms_norm(name: str, x: str) -> str:
            return g.add(
                "rms_norm", [x], name=name, params={"weight": g.param(f"{name}.weight", [hidden], dtype)}, eps=eps
            )

        def reduce(name: str, x: str) -> str:
            return g.add("all_reduce", [x], name=f"{name}.all_reduce") if tp > 1 else x

        if mapping.is_first_stage(rank):
            w = g.param("embed_tokens.weight", [vocab, hidden], dtype)
            x = g.add("embedding", ["input_ids"], name="embed_tokens", params={"weight": w})
            inputs = ["input_ids"]
        else:
            x = inputs = "hidden_states"
            inputs = [x]
        for i in layers:
            p = f"layers.{i}"
            h = rms_norm(f"{p}.input_layernorm", x)
            q = linear(f"{p}.self_attn.q_proj", h, nh * hd, hidden, "column")
            k = linear(f"{p}.self_attn.k_proj", h, nkv * hd, hidden, "column")
            v = linear(f"{p}.self_attn.v_proj", h, nkv * hd, hidden, "column")
            qkv = g.add("concat", [q, k, v], name=f"{p}.self_attn.qkv", axis=-1)
            a = g.add(
                "attention",
                [qkv],
                name=f"{p}.self_attn.core",
                num_heads=nh,
                num_kv_heads=nkv,
                head_dim=hd,
                cache_slot=f"layer{i}",
                position_embedding="rope",
                rope_theta=config["rope_theta"],
            )
            a = reduce(f"{p}.self_attn", linear(f"{p}.self_attn.o_proj", a, hidden, nh * hd, "row"))
            x = g.add("add", [x, a], name=f"{p}.attn_residual")
            h = rms_norm(f"{p}.post_attention_layernorm", x)
            gate = g.add("silu", [linear(f"{p}.mlp.gate_proj", h, ffn, hidden, "column")], name=f"{p}.mlp.act")
            up = linear(f"{p}.mlp.up_proj", h, ffn, hidden, "column")
            m = g.add("mul", [gate, up], name=f"{p}.mlp.gated")
            m = reduce(f"{p}.mlp", linear(f"{p}.mlp.down_proj", m, hidden, ffn, "row"))
            x = g.add("add", [x, m], name=f"{p}.mlp_residual")
        if mapping.is_last_stage(rank):
            x = linear("lm_head", rms_norm("norm", x), vocab // tp, hidden, "column")
            if tp > 1:
                x = g.add("all_gather", [x], name="lm_head.all_gather", axis=-1)
        return g.build(inputs, [x], attrs={"dtype": dtype, "rank": rank, "layers": [layers.start, layers.stop]})


def lower_concat(node, low):
    axis = int(node.attrs["axis"])
    return lambda ctx, *xs: torch.cat(xs, dim=axis)


class ToyLlamaPlugin:
    """Everything the family needs, through the public hooks only."""

    @hookimpl
    def register_architectures(self, register):
        register(ToyLlama())

    @hookimpl
    def register_ops(self, register):
        register(OpSpec("concat", "Concatenate the inputs along `axis`.", num_inputs=(2, 8), attrs=("axis",)))

    @hookimpl
    def register_lowerings(self, register):
        register(Lowering("concat", "torch", lower_concat))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
        rope_theta=5000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("llama") / "hf"
    model.save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="module")
def llama_registry() -> Registry:
    """The installed plugins plus this file's family."""
    return Host.load(extra={"toy_llama": ToyLlamaPlugin()}).registry


@pytest.mark.parametrize(
    "tp,pp,by_shard", [(1, 1, False), (2, 1, False), (1, 2, True), (2, 2, False)], ids=lambda v: str(v)
)
def test_llama_family_as_a_plugin_matches_transformers(llama_registry, llama_dir, tmp_path, tp, pp, by_shard):
    from transformers import LlamaForCausalLM

    out = tmp_path / "ckpt"
    mapping = Mapping.create(tp, pp)
    config = convert(
        llama_dir, out, dtype="float32", mapping=mapping, load_by_shard=by_shard, show_progress=False,
        registry=llama_registry,
    )  # fmt: skip
    assert config.architecture == ARCH
    graph = rank_graph(llama_registry, config, 0)
    assert {"concat", "rms_norm", "silu", "mul"} <= {n.op for n in graph.nodes}

    ids = torch.tensor([[0, 0, 5, 17, 42, 7, 3], [11, 12, 13, 14, 15, 16, 18]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    hf = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits

    runner = checkpoint_runner(out, registry=llama_registry)
    runner.allocate(2, 16)
    # Prompt minus its last token, then the last token alone through the KV cache.
    prompt = runner.logits(ids[:, :-1], positions_from_mask(mask)[:, :-1], mask[:, :-1], 0)
    step = runner.logits(ids[:, -1:], positions_from_mask(mask)[:, -1:], mask, ids.shape[1] - 1)
    got = torch.cat([prompt, step], dim=1)
    real = mask.bool()
    assert got.shape == ref.shape
    assert (got - ref)[real].abs().max().item() < 1e-4
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


def test_family_disappears_with_its_plugin(llama_dir, tmp_path):
    """Without the plugin the core does not know the family: the error names the config."""
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match=r"config\.json: no loaded plugin supports model_type 'llama'"):
        convert(llama_dir, tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_awq_derives_scale_groups_for_a_family_that_names_none(llama_dir, llama_registry):
    """The family does not override scale_groups: AWQ still scales, with the groups the graph
    implies, and the checkpoint says which ones it used."""
    from compiler_core.convert.from_hf import load_full_model
    from compiler_core.quantize.calibration import CalibrationBatch, CalibrationSet

    model = load_full_model(llama_registry, llama_dir, "float32", show_progress=False)
    norm_before = model.weights["layers.0.input_layernorm.weight"].clone()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (4, 32))
    calibration = CalibrationSet((CalibrationBatch(ids, torch.ones_like(ids)),), "random ids")
    scheme = llama_registry.quant_scheme("int4_awq", "--qformat")
    options = {"group_size": 16, "device": "cpu", "show_progress": False, "registry": llama_registry}
    quantized = scheme.quantize(model, calibration, options)
    used = quantized.config.quantization.extras["scale_groups"]
    assert used["source"] == "graph"
    attn = "layers.0.self_attn"
    assert used["groups"]["layers.0.input_layernorm"] == [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    assert used["groups"]["layers.0.post_attention_layernorm"] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    assert not any(f"{attn}.o_proj" in linears for linears in used["groups"].values())  # reads attention
    # The searched scale was folded into the norm that feeds the group.
    assert not torch.equal(quantized.weights["layers.0.input_layernorm.weight"], norm_before)


def test_cli_commands_use_the_host_on_the_click_context(llama_dir, tmp_path):
    """``modelc convert`` and ``modelc inspect`` run with the host they are given (``ctx.obj``), so
    a family only that host knows converts and lists; without it the same command refuses."""
    from click.testing import CliRunner

    from compiler_core.cli import cli

    host = Host.load(extra={"toy_llama": ToyLlamaPlugin()})
    out = tmp_path / "ckpt"
    args = ["convert", "--model_dir", str(llama_dir), "--output_dir", str(out), "--tp_size", "2"]
    converted = CliRunner().invoke(cli, args, obj=host)
    assert converted.exit_code == 0, converted.output
    assert f"converted {ARCH} (float32, tp=2 pp=1)" in converted.stdout
    listed = CliRunner().invoke(cli, ["inspect", str(out), "--nodes", "0"], obj=host)
    assert listed.exit_code == 0, listed.output
    assert f"architecture: {ARCH}" in listed.stdout
    refused = CliRunner().invoke(cli, [*args[:-4], "--output_dir", str(tmp_path / "other")])
    assert refused.exit_code == 2
    assert "no loaded plugin supports model_type 'llama'" in refused.stderr
