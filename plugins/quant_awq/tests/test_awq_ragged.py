"""int4_awq for input dims that are not whole groups (a ragged last group), end to end.

The model is a tiny falcon-7b (MQA, parallel attention, one shared layer norm) whose hidden size
96 is one group of 64 plus a ragged one of 32, as the real falcon-7b's 4544 is 35 groups of 128
plus one of 64; its MLP width 384 is whole groups, as 18176 is. So qkv, fc and the attention
output (row-parallel) have a ragged last group and the down projection (with its prequant scale)
has none.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiler_core.formats.checkpoint import load_rank_weights, rank_file, read_config
from modelc_plugins.falcon.convert import grouped_to_planar, ir_name
from modelc_plugins.quant_awq.int4 import dequantize_packed, fake_quantize
from modelc_plugins.quant_awq.testing import (
    CALIB,
    add_outlier_channels,
    dequantized_hf,
    hf_logits,
    hf_model,
    modelc_logits,
    refused_quantize,
    relative_error,
    run_modelc,
)

HIDDEN, GROUP, FFN = 96, 64, 384
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 24
VARIANT = "7b"
CALIB_FLAGS = ("--calib_size", str(CALIB["calib_size"]), "--calib_max_seq_length", str(CALIB["calib_max_seq_length"]))
#: The attention output is row-parallel with a ragged input: at tp 2 each rank would hold 48 of
#: its 96 inputs, cutting the group of 64. Splits leave it unquantized.
NO_DENSE = ("--exclude_modules", "lm_head,*.attention.dense")


@pytest.fixture(scope="module")
def ragged_hf(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer tiny falcon-7b with hidden size 96 and outlier layer-norm channels."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    root = tmp_path_factory.mktemp("ragged-hf")
    base = make_tiny_falcon(root / "random", VARIANT, num_layers=2, hidden_size=HIDDEN, tokenizer=tokenizer)
    return add_outlier_channels(base, root / "hf", tokenizer)


def quantize_cli(hf: Path, out: Path, *flags: str) -> Path:
    """``modelc quantize --qformat int4_awq --group_size 64`` of ``hf``, which must succeed."""
    code, stderr = run_modelc(
        "quantize",
        "--model_dir",
        str(hf),
        "--output_dir",
        str(out),
        "--qformat",
        "int4_awq",
        "--group_size",
        str(GROUP),
        "--dtype",
        "float32",
        *CALIB_FLAGS,
        *flags,
    )
    assert code == 0, stderr
    return out


def build_cli(checkpoint: Path, out: Path, backend: str) -> Path:
    code, stderr = run_modelc(
        "build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(out), "--backend", backend
    )
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def ragged_ckpt(tmp_path_factory, ragged_hf) -> Path:
    return quantize_cli(ragged_hf, tmp_path_factory.mktemp("ragged") / "ckpt")


def test_checkpoint_has_ragged_groups_with_short_group_scales(ragged_hf, ragged_ckpt) -> None:
    """Scales are [out, ceil(in / 64)]; the last group's scale is amax / 7 of its own 32 channels.

    qkv is the linear to check by hand: it is not clipped (it feeds attention) and its AWQ scale
    ``s`` is folded into the layer norm, so ``s = ln_hf / ln_checkpoint`` and the quantized weight
    is ``W * s`` exactly.
    """
    config = read_config(ragged_ckpt)
    assert config.quantization.group_size == GROUP
    w = load_rank_weights(rank_file(ragged_ckpt, 0))
    rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    for name, out, inp in [
        ("attention.qkv", rows, HIDDEN),
        ("attention.dense", HIDDEN, HIDDEN),
        ("mlp.fc", FFN, HIDDEN),
        ("mlp.proj", HIDDEN, FFN),
    ]:
        assert w[f"layers.0.{name}.weight"].shape == (out, inp // 2), name
        assert w[f"layers.0.{name}.weights_scaling_factor"].shape == (out, -(-inp // GROUP)), name
    assert w["layers.0.mlp.proj.prequant_scaling_factor"].shape == (FFN,)

    hf = hf_model(ragged_hf).state_dict()
    ln = "transformer.h.0.input_layernorm.weight"
    s = hf[ln] / w[ir_name(ln)]
    qkv = grouped_to_planar(hf["transformer.h.0.self_attention.query_key_value.weight"], HEADS, KV_HEADS, HEAD_DIM)
    scaled = qkv * s
    scales = w["layers.0.attention.qkv.weights_scaling_factor"]
    torch.testing.assert_close(scales[:, 0], scaled[:, :GROUP].abs().amax(1) / 7, rtol=1e-5, atol=0)
    torch.testing.assert_close(scales[:, 1], scaled[:, GROUP:].abs().amax(1) / 7, rtol=1e-5, atol=0)
    # Every weight dequantizes to within half a step of its own group's scale.
    dense = dequantize_packed(w["layers.0.attention.qkv.weight"], scales, GROUP, torch.float32)
    step = torch.cat([scales[:, :1].expand(-1, GROUP), scales[:, 1:].expand(-1, HIDDEN - GROUP)], dim=1)
    assert ((dense - scaled).abs() <= step / 2 * (1 + 1e-4)).all()


def test_torch_execution_matches_hand_dequantized_transformers(ragged_hf, ragged_ckpt, eval_ids) -> None:
    """The torch (CPU) kernels compute exactly the function of the dequantized ragged weights."""
    ref = hf_logits(dequantized_hf(ragged_hf, ragged_ckpt), eval_ids)
    torch.testing.assert_close(modelc_logits(ragged_ckpt, eval_ids), ref, atol=1e-4, rtol=1e-4)


def test_accuracy_against_unquantized_and_rtn(ragged_hf, ragged_ckpt, eval_ids) -> None:
    """The bounds of test_awq_falcon's accuracy test; a ragged group scaled or placed wrongly
    gives errors far above them."""
    ref = hf_logits(hf_model(ragged_hf), eval_ids)
    awq = modelc_logits(ragged_ckpt, eval_ids)
    rtn_model = hf_model(ragged_hf)
    with torch.no_grad():
        for name, module in rtn_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, GROUP))
    err_awq, err_rtn = relative_error(awq, ref), relative_error(hf_logits(rtn_model, eval_ids), ref)
    top1 = (awq.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert err_awq < 0.4, f"relative logit error {err_awq:.3f}"
    assert top1 >= 0.55, f"top-1 agreement {top1:.3f}"
    assert err_awq < 0.9 * err_rtn, f"AWQ {err_awq:.4f} vs RTN {err_rtn:.4f}"


def test_onnxruntime_engine_equals_torch_engine(registry, ragged_ckpt, tmp_path) -> None:
    """``modelc build`` for torch and onnx, then ``modelc run``: same logits, same greedy tokens."""
    pytest.importorskip("onnxruntime")
    if "onnx" not in registry.backends:
        pytest.skip("the onnx backend plugin is not loaded")
    import onnx

    from modelc_plugins.onnx.testing import left_padded, local_runner, prefill_logits

    engines = {b: build_cli(ragged_ckpt, tmp_path / b, b) for b in ("torch", "onnx")}
    ids, mask = left_padded([[5, 77, 120, 33, 9, 250, 18, 61, 300, 2, 45, 17], [150, 3, 99, 8]])
    out = {b: prefill_logits(local_runner(e), ids, mask) for b, e in engines.items()}
    real = mask.bool()
    assert (out["onnx"] - out["torch"])[real].abs().max().item() < 1e-4

    tokens = {}
    for backend, engine in engines.items():
        result = tmp_path / f"{backend}.json"
        args = ("run", "--engine_dir", str(engine), "--input_ids", "5,77,120,33,9", "--max_output_len", "6")
        code, stderr = run_modelc(*args, "--output_json", str(result))
        assert code == 0, stderr
        tokens[backend] = result.read_text()
    assert tokens["onnx"] == tokens["torch"]

    # Ragged layers reach ONNX as whole blocks (TensorRT's parser needs them): the weight padded
    # with zero codes to 128 inputs and the activation padded to match; whole-group layers as before.
    model = onnx.load(str(engines["onnx"] / "rank0.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.input[0].removesuffix(".weight.T"): n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    padded = -(-HIDDEN // GROUP) * GROUP
    expect = {
        "attention.qkv": (padded, rows),
        "attention.dense": (padded, HIDDEN),
        "mlp.fc": (padded, FFN),
        "mlp.proj": (FFN, HIDDEN),
    }
    producer = {o: n for n in model.graph.node for o in n.output}
    matmul_of = {i: n for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    for layer in range(2):
        for name, (inp, out) in expect.items():
            node = dq[f"layers.{layer}.{name}"]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"axis": 0, "block_size": GROUP}
            assert list(inits[node.input[0]].dims) == [inp, out]
            assert list(inits[node.input[1]].dims) == [inp // GROUP, out]
            x = next(i for i in matmul_of[node.output[0]].input if i != node.output[0])
            assert (producer[x].op_type == "Pad") == (inp != FFN), name
    codes = onnx.numpy_helper.to_array(inits["layers.0.attention.qkv.weight.T"], str(engines["onnx"]))
    assert (codes[HIDDEN:] == 0).all() and (codes[:HIDDEN] != 0).any()


def test_tensorrt_parses_and_builds(ragged_ckpt, tmp_path) -> None:
    """TensorRT takes the padded ragged layers (Pad -> MatMul with a whole-block DequantizeLinear);
    running the engine needs a GPU."""
    from modelc_plugins.tensorrt.testing import build_checkpoint, require_tensorrt

    require_tensorrt()
    config = build_checkpoint(ragged_ckpt, tmp_path / "engine")
    assert [s["file"] for s in config["ranks"][0]["tensorrt"]["plan"]["steps"]] == ["rank0.engine"]
    assert (tmp_path / "engine" / "rank0.engine").stat().st_size > 0


def test_column_parallel_split_of_ragged_layers_matches_tp1(ragged_hf, tmp_path, eval_ids) -> None:
    """At tp 2, qkv and fc (column-parallel) split their rows and keep every ragged group whole;
    the down projection's 384 inputs split into 3 whole groups per rank."""
    tp1 = quantize_cli(ragged_hf, tmp_path / "tp1", *NO_DENSE)
    tp2 = quantize_cli(ragged_hf, tmp_path / "tp2", *NO_DENSE, "--tp_size", "2")
    w = load_rank_weights(rank_file(tp2, 1))
    assert w["layers.0.mlp.fc.weights_scaling_factor"].shape == (FFN // 2, 2)
    assert w["layers.0.mlp.proj.weights_scaling_factor"].shape == (HIDDEN, FFN // 2 // GROUP)
    torch.testing.assert_close(modelc_logits(tp2, eval_ids), modelc_logits(tp1, eval_ids), atol=2e-5, rtol=1e-5)


def test_row_parallel_split_inside_a_group_is_refused(ragged_hf, tmp_path) -> None:
    """The attention output's 96 inputs at tp 2 are 48 per rank: rank 1 would start inside the
    group of 64. Refused before calibration, naming the layer and the group sizes that fit."""
    flags = ("--group_size", str(GROUP), "--tp_size", "2", "--calib_size", "2")
    error = refused_quantize(ragged_hf, tmp_path / "never", *flags)
    assert "layer layers.0.attention.dense: input dim 96 split over tp_size 2 is 48 per rank" in error
    assert "not a multiple of group_size 64" in error and "group sizes that fit: 16" in error
