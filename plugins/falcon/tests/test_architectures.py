"""Config coverage: flag combinations transformers' FalconForCausalLM accepts beyond the five
named variants, legacy RefinedWeb/RefinedWebModel configs, and clear errors for the rest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compiler_core.errors import UsageError
from compiler_core.evaluate.verify import FP32_ATOL, compare, runner_trace
from compiler_core.formats.checkpoint import rank_file, read_config
from compiler_core.runtime.loading import checkpoint_runner
from modelc_plugins.falcon.config import config_from_hf

#: name -> (variant it starts from, FalconConfig overrides).
COMBOS: dict[str, tuple[str, dict]] = {
    "alibi+mqa+parallel": ("7b", {"alibi": True}),
    "bias+parallel": ("7b", {"bias": True}),
    "mha+parallel": ("7b", {"multi_query": False}),
    "alibi+new-arch+bias": ("40b", {"alibi": True, "bias": True}),
    "rope-linear-scaling": ("7b", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "relu": ("40b", {"activation": "relu"}),
    "silu": ("falcon2", {"activation": "silu"}),
    "gelu_pytorch_tanh": ("rw", {"activation": "gelu_pytorch_tanh"}),
    "gelu_new": ("7b", {"activation": "gelu_new"}),
    "untied+ffn96": ("40b", {"tie_word_embeddings": False, "ffn_hidden_size": 96}),
    # 6 heads: ALiBi slopes for a head count that is not a power of two.
    "alibi-6-heads": ("rw", {"num_attention_heads": 6, "hidden_size": 96}),
}
STEPS = 8


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)], ids=["tp1pp1", "tp2pp2"])
@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_flag_combinations_match_transformers(combo, tp, pp, tiny, batch, reference, converted):
    variant, overrides = COMBOS[combo]
    model_dir = tiny(variant, name=combo, **overrides)
    ref = reference(model_dir, "float32", STEPS)
    ckpt = converted(model_dir, tp, pp)
    report = compare(ref, runner_trace(checkpoint_runner(ckpt), batch, STEPS), batch, "float32")
    assert report.max_diff <= FP32_ATOL, report.lines()
    assert report.agreed == report.total, report.lines()


def test_untied_lm_head_is_its_own_weight(tiny, converted):
    ckpt = converted(tiny("40b", name="untied+ffn96", **COMBOS["untied+ffn96"][1]))
    with safe_open(str(rank_file(ckpt, 0)), "pt") as f:
        assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("embed.weight"))
        assert f.get_tensor("layers.0.mlp.fc.weight").shape == (96, 64)


def _base(variant: str) -> dict:
    from modelc_plugins.falcon.tiny import tiny_config

    return tiny_config(variant, vocab_size=390).to_dict()


UNSUPPORTED = [
    ("7b", {"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn=false"),
    ("7b", {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2"),
    ("40b", {"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn must be 1 or 2"),
    ("7b", {"activation": "tanh"}, "activation 'tanh'"),
    (
        "7b",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        "rope_scaling type 'dynamic'",
    ),
    ("rw", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("7b", {"hidden_size": 65}, "hidden_size 65 is not a multiple of num_attention_heads 4"),
    ("40b", {"num_kv_heads": 3}, "num_attention_heads 8 is not a multiple of num_kv_heads 3"),
    ("rw", {"num_kv_heads": 2}, "num_kv_heads 2 with multi_query=false"),
]


@pytest.mark.parametrize("variant,change,message", UNSUPPORTED, ids=[m.split()[0] for _, _, m in UNSUPPORTED])
def test_unsupported_configs_name_the_field(registry, variant, change, message, tmp_path):
    hf = {**_base(variant), **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(hf)
    # Through the converter: exit-2 error naming the file.
    from compiler_core.convert.from_hf import model_config_from_hf
    from compiler_core.mapping import Mapping

    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UsageError, match=re.escape("config.json: ")):
        model_config_from_hf(registry, tmp_path, "float32", Mapping())


@pytest.mark.parametrize(
    "change",
    [{"new_decoder_architecture": True, "parallel_attn": False}, {"num_ln_in_parallel_attn": 2}],
    ids=["new-arch-sequential", "two-lns-old-arch"],
)
def test_refused_layer_norm_layouts_do_not_run_in_transformers_either(change):
    """The refusals above are not arbitrary: FalconForCausalLM itself fails on these configs."""
    from transformers import FalconConfig, FalconForCausalLM

    fields = {k: v for k, v in _base("7b").items() if k in FalconConfig().to_dict()}
    model = FalconForCausalLM(FalconConfig(**{**fields, **change, "num_hidden_layers": 1})).eval()
    with pytest.raises((AttributeError, UnboundLocalError, NameError)):
        model(torch.tensor([[1, 2, 3]]))


def _legacy_dir(tmp_path: Path, model_dir: Path, legacy: dict) -> Path:
    """The same weights and tokenizer as ``model_dir`` under a hand-written legacy config.json.

    Hard links, not symlinks: a shard that is a symlink out of its model directory is refused."""
    out = tmp_path / f"legacy-{legacy['model_type']}"
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            os.link(f, out / f.name)
    (out / "config.json").write_text(json.dumps(legacy, indent=1))
    return out


def _legacy_config(modern: dict, model_type: str, **fields) -> dict:
    return {
        "model_type": model_type,
        "architectures": ["RWForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
        "apply_residual_connection_post_layernorm": False,
        "vocab_size": modern["vocab_size"],
        "layer_norm_epsilon": modern["layer_norm_epsilon"],
        "bos_token_id": modern["bos_token_id"],
        "eos_token_id": modern["eos_token_id"],
        "max_position_embeddings": modern["max_position_embeddings"],
        "torch_dtype": "float32",
        **fields,
    }


LEGACY = {
    # falcon-rw-1b's original config: RefinedWebModel, sequential, ALiBi, biases.
    "rw": (
        "RefinedWebModel",
        {
            "hidden_size": 64,
            "n_head": 4,
            "n_layer": 3,
            "alibi": True,
            "bias": True,
            "multi_query": False,
            "parallel_attn": False,
        },
    ),
    # falcon-7b's: RefinedWebModel, multi-query, parallel; n_embed spelling of the hidden size.
    "7b": (
        "RefinedWebModel",
        {
            "n_embed": 64,
            "n_head": 4,
            "n_layer": 3,
            "alibi": False,
            "bias": False,
            "multi_query": True,
            "parallel_attn": True,
        },
    ),
    # falcon-40b's: RefinedWeb (always the new decoder architecture), n_head_kv KV groups.
    "40b": (
        "RefinedWeb",
        {
            "hidden_size": 64,
            "n_head": 8,
            "n_head_kv": 2,
            "n_layer": 3,
            "alibi": False,
            "bias": False,
            "parallel_attn": True,
        },
    ),
}


@pytest.mark.parametrize("variant", sorted(LEGACY))
def test_legacy_refinedweb_configs_convert_to_the_same_checkpoint(variant, tiny, converted, batch, tmp_path):
    model_dir = tiny(variant)
    model_type, fields = LEGACY[variant]
    modern = json.loads((model_dir / "config.json").read_text())
    legacy_dir = _legacy_dir(tmp_path, model_dir, _legacy_config(modern, model_type, **fields))
    a, b = converted(model_dir, 2, 1), converted(legacy_dir, 2, 1)
    for rank in range(2):
        assert rank_file(a, rank).read_bytes() == rank_file(b, rank).read_bytes()
    ca, cb = read_config(a), read_config(b)
    assert ca == cb
    ids, mask = batch.ids, batch.mask
    from compiler_core.runtime.context import positions_from_mask

    logits = []
    for ckpt in (a, b):
        runner = checkpoint_runner(ckpt)
        runner.allocate(*ids.shape)
        logits.append(runner.logits(ids, positions_from_mask(mask), mask, 0))
    assert torch.equal(logits[0], logits[1])
