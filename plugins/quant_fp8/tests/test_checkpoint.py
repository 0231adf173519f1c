"""What an FP8 checkpoint holds (config.json, rank files), its TP/PP splits, and the quantize_layer dispatch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compiler_core import hookimpl
from compiler_core.errors import ModelcError
from compiler_core.formats.checkpoint import load_rank_weights
from compiler_core.host import Host
from compiler_core.mapping import Mapping
from compiler_core.quantize.ptq import quantize
from modelc_plugins.falcon.convert import rank_qkv
from modelc_plugins.quant_fp8 import numerics
from modelc_plugins.quant_fp8.scheme import FP8Scheme, quantize_linear
from modelc_plugins.quant_fp8.testing import CALIB, checkpoint_logits

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj")


def rank_dtypes(path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()}


def test_config_and_rank_file_layout(fp8_dir):
    ckpt = fp8_dir("7b")
    config = json.loads((ckpt / "config.json").read_text())
    q = config["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"], q["exclude_modules"]) == ("FP8", "FP8", ["lm_head"])
    assert q["calibration"]["num_samples"] == CALIB["calib_size"]
    assert q["calibration"]["num_tokens"] == CALIB["calib_size"] * CALIB["calib_max_seq_length"]
    assert config["dtype"] == "float32"
    tensors = rank_dtypes(ckpt / "rank0.safetensors")
    for layer in range(2):
        for linear in LINEARS:
            base = f"layers.{layer}.{linear}"
            assert tensors[f"{base}.weight"][0] == "F8_E4M3"
            assert tensors[f"{base}.weights_scaling_factor"] == ("F32", [1])
            assert tensors[f"{base}.activation_scaling_factor"] == ("F32", [1])
        assert tensors[f"layers.{layer}.attention.core.kv_cache_scaling_factor"] == ("F32", [1])
    # lm_head (excluded by default), embeddings and norms stay in the checkpoint dtype, unscaled.
    assert tensors["lm_head.weight"][0] == "F32" and "lm_head.weights_scaling_factor" not in tensors
    assert {d for k, (d, _) in tensors.items() if "layernorm" in k or k.startswith(("embed", "ln_f"))} == {"F32"}
    scaled = sorted(k for k in tensors if k.endswith("scaling_factor"))
    assert len(scaled) == 2 * (2 * len(LINEARS) + 1)


def test_scales_are_amax_over_448_of_the_source_weights(registry, fp8_dir, hf_dir):
    from compiler_core.convert.from_hf import load_full_model

    full = load_full_model(registry, hf_dir("40b"), "float32", show_progress=False).weights
    got = load_rank_weights(fp8_dir("40b") / "rank0.safetensors")
    for name in ("layers.0.attention.qkv", "layers.1.mlp.proj"):
        w = full[f"{name}.weight"]
        scale = got[f"{name}.weights_scaling_factor"]
        assert scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-6)
        assert torch.equal(got[f"{name}.weight"].view(torch.uint8), numerics.quantize(w, scale).view(torch.uint8))
        assert got[f"{name}.activation_scaling_factor"].item() > 0


@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
def test_tp2_equals_tp1(variant, fp8_dir, eval_ids):
    """Same scales on every rank, weights split like the unquantized ones (Falcon's QKV reorder and
    KV-head duplication included), and the same logits."""
    tp1 = load_rank_weights(fp8_dir(variant) / "rank0.safetensors")
    config = json.loads((fp8_dir(variant) / "config.json").read_text())
    for rank in range(2):
        part = load_rank_weights(fp8_dir(variant, tp=2) / f"rank{rank}.safetensors")
        for name, tensor in part.items():
            if name.endswith("scaling_factor"):
                assert torch.equal(tensor, tp1[name]), name
        qkv = "layers.0.attention.qkv.weight"
        want = rank_qkv(
            tp1[qkv].view(torch.uint8),
            config["num_attention_heads"],
            config["num_kv_heads"],
            config["head_dim"],
            2,
            rank,
        )
        assert part[qkv].dtype == torch.float8_e4m3fn and torch.equal(part[qkv].view(torch.uint8), want)
        proj = "layers.1.mlp.proj.weight"  # row-parallel: split along the input axis
        assert torch.equal(part[proj].view(torch.uint8), tp1[proj].view(torch.uint8).chunk(2, dim=1)[rank])
    one = checkpoint_logits(fp8_dir(variant), eval_ids)
    two = checkpoint_logits(fp8_dir(variant, tp=2), eval_ids)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4 * one.abs().max().item())


def test_pp2_equals_pp1(fp8_dir, eval_ids):
    one = checkpoint_logits(fp8_dir("falcon2"), eval_ids)
    two = checkpoint_logits(fp8_dir("falcon2", pp=2), eval_ids)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5 * one.abs().max().item())


def test_exclude_modules(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    quantize(
        hf_dir("rw"), out, qformat="fp8", exclude_modules=["layers.0.*"], device="cpu", show_progress=False, **CALIB
    )
    tensors = rank_dtypes(out / "rank0.safetensors")
    assert json.loads((out / "config.json").read_text())["quantization"]["exclude_modules"] == ["layers.0.*"]
    assert tensors["layers.0.mlp.fc.weight"][0] == "F32" and "layers.0.mlp.fc.weights_scaling_factor" not in tensors
    assert tensors["layers.1.mlp.fc.weight"][0] == "F8_E4M3"
    assert tensors["lm_head.weight"][0] == "F8_E4M3"  # an explicit list replaces the default
    assert not any(k.endswith("kv_cache_scaling_factor") for k in tensors)


class OverrideOneLayer(FP8Scheme):
    """A scheme derived from FP8 that quantizes one layer its own way (``--qformat fp8_override``).

    Its checkpoints say quant_algo FP8, so the FP8 scheme's own ``transform_graph`` rebuilds them;
    this one leaves graphs alone rather than rewriting them a second time.
    """

    name = "fp8_override"

    def __init__(self, answer) -> None:
        self.answer = answer

    def transform_graph(self, graph, config):
        return graph

    def quantize_layer(self, node, graph, weights, stats):
        if node.name == "layers.1.mlp.fc":
            return self.answer(node, weights, stats)
        return super().quantize_layer(node, graph, weights, stats)


def _quantize_with(scheme: OverrideOneLayer, model_dir, out) -> None:
    """``quantize --qformat fp8_override`` with ``scheme`` registered by a throwaway plugin."""

    class Registers:
        @hookimpl
        def register_quant_schemes(self, register):
            register(scheme)

    registry = Host.load(extra={"override_one_layer": Registers()}).registry
    quantize(model_dir, out, qformat=scheme.name, device="cpu", show_progress=False, registry=registry, **CALIB)


def test_a_derived_scheme_can_quantize_a_layer_its_own_way(hf_dir, tmp_path):
    def doubled_activation_range(node, weights, stats):
        return quantize_linear(node, weights, {**stats, "input_amax": 2 * stats["input_amax"]})

    out = tmp_path / "ckpt"
    _quantize_with(OverrideOneLayer(doubled_activation_range), hf_dir("7b"), out)
    got = load_rank_weights(out / "rank0.safetensors")
    other = load_rank_weights(_default_7b(hf_dir, tmp_path) / "rank0.safetensors")
    name = "layers.1.mlp.fc.activation_scaling_factor"
    assert got[name].item() == pytest.approx(2 * other[name].item(), rel=1e-6)
    untouched = "layers.1.attention.qkv.activation_scaling_factor"
    assert got[untouched].item() == other[untouched].item()


def _default_7b(hf_dir, tmp_path):
    out = tmp_path / "default"
    quantize(hf_dir("7b"), out, qformat="fp8", device="cpu", show_progress=False, **CALIB)
    return out


def test_a_layer_that_disagrees_with_the_graph_rewrite_is_refused(hf_dir, tmp_path):
    """transform_graph rebuilds the quantized graph from config.json alone; a layer answer that does
    not match it must fail before anything is written."""

    def left_in_full_precision(node, weights, stats):
        return [node], {}

    with pytest.raises(ModelcError, match=r"layers\.1\.mlp\.fc\.weight is float32.*wants float8_e4m3fn"):
        _quantize_with(OverrideOneLayer(left_in_full_precision), hf_dir("7b"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bfloat16_checkpoint(hf_dir, tmp_path, eval_ids, hf_logits):
    out = tmp_path / "bf16"
    quantize(
        hf_dir("40b"),
        out,
        qformat="fp8",
        kv_cache_dtype="fp8",
        dtype="bfloat16",
        mapping=Mapping.create(2, 1),
        device="cpu",
        show_progress=False,
        **CALIB,
    )
    tensors = rank_dtypes(out / "rank1.safetensors")
    assert tensors["layers.0.mlp.fc.weight"][0] == "F8_E4M3" and tensors["ln_f.weight"][0] == "BF16"
    assert tensors["layers.0.mlp.fc.activation_scaling_factor"] == ("F32", [1])
    logits = checkpoint_logits(out, eval_ids)
    ref = hf_logits("40b")
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_fp8_kv_cache_on_top_of_another_weight_format(registry, hf_dir, tmp_path, eval_ids, hf_logits):
    """--kv_cache_dtype fp8 is served by this plugin whatever --qformat is (here the AWQ plugin's)."""
    if "int4_awq" not in registry.quant_schemes:
        pytest.skip("the quant_awq plugin is not loaded")
    out = tmp_path / "awq_kv"
    config, _ = quantize(
        hf_dir("7b"), out, qformat="int4_awq", kv_cache_dtype="fp8", group_size=16, device="cpu",
        show_progress=False, **CALIB,
    )  # fmt: skip
    assert (config.quantization.quant_algo, config.quantization.kv_cache_quant_algo) == ("W4A16_AWQ", "FP8")
    tensors = rank_dtypes(out / "rank0.safetensors")
    assert tensors["layers.1.attention.core.kv_cache_scaling_factor"] == ("F32", [1])
    assert not any(k.endswith("activation_scaling_factor") for k in tensors)  # the linears are AWQ's
    logits = checkpoint_logits(out, eval_ids)
    assert (logits.argmax(-1) == hf_logits("7b").argmax(-1)).float().mean() >= 0.9
