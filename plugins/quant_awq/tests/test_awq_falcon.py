"""int4_awq on tiny Falcons of every variant: checkpoint format, exact execution, accuracy, TP/PP, errors."""

from __future__ import annotations

import pytest
import torch

from compiler_core.formats.checkpoint import load_rank_weights, rank_file, read_config
from modelc_plugins.quant_awq.int4 import unpack_int4
from modelc_plugins.quant_awq.testing import (
    CALIB,
    GROUP_SIZE,
    dequantized_hf,
    hf_logits,
    hf_model,
    modelc_logits,
    refused_quantize,
    relative_error,
    rtn_hf,
)

VARIANTS = ["rw", "7b", "40b", "180b", "falcon2"]


def test_checkpoint_format(awq_dir) -> None:
    ckpt = awq_dir("7b")
    config = read_config(ckpt)
    assert config.quantization.exclude_modules == ("lm_head",)
    q = config.quantization.to_json()  # the section as config.json holds it
    assert q["quant_algo"] == "W4A16_AWQ"
    assert q["group_size"] == GROUP_SIZE and q["has_zero_point"] is False
    assert q["exclude_modules"] == ["lm_head"]
    # Falcon names its groups (the hook wins over the core's derivation, which would add ln_f).
    assert q["scale_groups"]["source"] == "architecture"
    assert q["scale_groups"]["groups"]["layers.0.input_layernorm"] == ["layers.0.attention.qkv", "layers.0.mlp.fc"]
    assert "ln_f" not in q["scale_groups"]["groups"]
    # GELU cannot absorb a scale, so the MLP down projections keep theirs; the shared layer norm
    # absorbs the scale of qkv and fc; the attention output has no scale group.
    assert q["pre_quant_scale"] is True
    assert q["pre_quant_scale_modules"] == ["layers.0.mlp.proj", "layers.1.mlp.proj"]
    w = load_rank_weights(rank_file(ckpt, 0))
    hidden, ffn, rows = 64, 256, (4 + 2) * 16
    assert w["layers.0.attention.qkv.weight"].dtype == torch.int8
    assert w["layers.0.attention.qkv.weight"].shape == (rows, hidden // 2)
    assert w["layers.0.attention.qkv.weights_scaling_factor"].shape == (rows, hidden // GROUP_SIZE)
    assert w["layers.0.attention.qkv.weights_scaling_factor"].dtype == torch.float32
    assert w["layers.0.mlp.proj.weight"].shape == (hidden, ffn // 2)
    assert w["layers.0.mlp.proj.prequant_scaling_factor"].shape == (ffn,)
    assert "layers.0.mlp.fc.prequant_scaling_factor" not in w
    assert w["lm_head.weight"].dtype == torch.float32
    codes = unpack_int4(w["layers.0.mlp.fc.weight"])
    assert codes.min() >= -8 and codes.max() <= 7 and (codes != 0).float().mean() > 0.5


@pytest.mark.parametrize("variant", VARIANTS)
def test_execution_matches_hand_dequantized_transformers(variant, hf_dir, awq_dir, eval_ids) -> None:
    """The awq_linear kernels, packing, scale layout, prequant and norm folding compute exactly the
    function of the dequantized weights, checked by transformers' own Falcon."""
    ckpt = awq_dir(variant)
    ref = hf_logits(dequantized_hf(hf_dir(variant), ckpt), eval_ids)
    out = modelc_logits(ckpt, eval_ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_cpu_fast_linear_runs_the_dequantized_weights(monkeypatch, hf_dir, awq_dir, eval_ids) -> None:
    """On CPU the dequantized weights take the runtime's oneDNN linear (forced here for the tiny
    model's small weights) and still compute the dequantized model."""
    from compiler_core.backends.torch import cpu_linear

    if not cpu_linear.onednn_linear_supported():
        pytest.skip("this torch build or CPU has no oneDNN float32 inner product")
    ckpt, ids = awq_dir("40b"), eval_ids[:1, :16]  # quantized first: calibration runs float linears
    calls = []
    inner_product = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        calls.append(args[1].shape)
        return inner_product(*args)

    monkeypatch.setattr(cpu_linear, "MIN_ONEDNN_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    out = modelc_logits(ckpt, ids)
    assert any(shape[0] != out.shape[-1] for shape in calls)  # not only the (unquantized) lm_head
    torch.testing.assert_close(out, hf_logits(dequantized_hf(hf_dir("40b"), ckpt), ids), atol=1e-4, rtol=1e-4)


def test_excluded_linear_in_a_folded_group_keeps_its_scale(hf_dir, eval_ids, tmp_path) -> None:
    """7b's shared layer norm feeds qkv and fc; with fc excluded the norm still absorbs the scale
    searched for qkv, so fc's full-precision weight must carry it (W * s) to stay exact."""
    from compiler_core.quantize.ptq import quantize

    config, _ = quantize(
        hf_dir("7b"),
        tmp_path / "ckpt",
        qformat="int4_awq",
        group_size=GROUP_SIZE,
        exclude_modules=["lm_head", "*.mlp.fc"],
        device="cpu",
        show_progress=False,
        **CALIB,
    )
    assert config.quantization.exclude_modules == ("lm_head", "*.mlp.fc")
    weights = load_rank_weights(rank_file(tmp_path / "ckpt", 0))
    assert weights["layers.0.mlp.fc.weight"].dtype == torch.float32
    assert "layers.0.mlp.fc.weights_scaling_factor" not in weights
    ref = hf_logits(dequantized_hf(hf_dir("7b"), tmp_path / "ckpt"), eval_ids)
    torch.testing.assert_close(modelc_logits(tmp_path / "ckpt", eval_ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_accuracy_against_unquantized_and_rtn(variant, hf_dir, awq_dir, eval_ids) -> None:
    """On held-out text, against the unquantized model: relative logit error below 0.4, top-1
    agreement at least 0.55, and at most 0.9x the error of plain round-to-nearest INT4.

    Why these numbers: random-weight tiny Falcons (std 0.25 weights) have very peaked attention
    and flat next-token distributions, so 4-bit noise moves their logits far more than a trained
    model's. Measured here: AWQ 0.27-0.32 relative error and 0.64-0.73 top-1; RTN 0.35-0.43 and
    0.46-0.62 (AWQ/RTN 0.71-0.83). A broken layout (nibble order, scale axis, a missed fold)
    gives errors above 1 and chance-level agreement (1/390)."""
    ref = hf_logits(hf_model(hf_dir(variant)), eval_ids)
    awq = modelc_logits(awq_dir(variant), eval_ids)
    rtn = hf_logits(rtn_hf(hf_dir(variant)), eval_ids)
    err_awq, err_rtn = relative_error(awq, ref), relative_error(rtn, ref)
    top1 = (awq.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert err_awq < 0.4, f"{variant}: relative logit error {err_awq:.3f}"
    assert top1 >= 0.55, f"{variant}: top-1 agreement {top1:.3f}"
    assert err_awq < 0.9 * err_rtn, f"{variant}: AWQ {err_awq:.4f} vs RTN {err_rtn:.4f}"


@pytest.mark.parametrize(("variant", "tp", "pp"), [("40b", 2, 1), ("7b", 2, 1), ("rw", 2, 1), ("falcon2", 1, 2)])
def test_split_checkpoints_match_tp1(variant, tp, pp, awq_dir, eval_ids) -> None:
    """Column-parallel splits cut packed rows and their scales (through Falcon's QKV reorder, with
    KV heads duplicated for 7b), row-parallel splits cut packed columns, group scales and the
    prequant vector; the quantized model computes the same logits however it is split."""
    one = modelc_logits(awq_dir(variant), eval_ids)
    split = modelc_logits(awq_dir(variant, tp, pp), eval_ids)
    torch.testing.assert_close(split, one, atol=2e-5, rtol=1e-5)


def test_row_parallel_split_must_hold_whole_groups(hf_dir, tmp_path) -> None:
    """TP2 of a 64-wide attention output leaves 32 inputs per rank: group_size 64 cannot split it.
    The error names the layer, the dims and the group size, before any calibration."""
    flags = ("--group_size", "64", "--tp_size", "2", "--calib_size", "2")
    error = refused_quantize(hf_dir("40b"), tmp_path / "never", *flags)
    assert "layers.0.attention.dense" in error
    assert "input dim 64 split over tp_size 2 is 32 per rank" in error
    assert "group_size 64" in error and "32, 16" in error


def test_odd_input_dim_is_refused(tokenizer, tmp_path) -> None:
    """Two int4 codes share a byte along the input dim, so an odd one is refused, naming the layer,
    before any calibration. (Dims that are not whole groups are fine: see test_awq_ragged.py.)"""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    # An odd hidden size needs an odd head dim, which transformers refuses; an odd MLP width will do.
    hf = make_tiny_falcon(tmp_path / "hf", "rw", num_layers=1, ffn_hidden_size=255, tokenizer=tokenizer)
    error = refused_quantize(hf, tmp_path / "never", "--awq_block_size", "128", "--calib_size", "2")
    assert "layer layers.0.mlp.proj: input dim 255 is odd" in error
    assert "odd input dims are not supported" in error and "--exclude_modules" in error
