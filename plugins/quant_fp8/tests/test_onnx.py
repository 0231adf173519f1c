"""fp8 checkpoints through the onnx backend (run by onnxruntime) and TensorRT (parsed and built here)."""

from __future__ import annotations

import onnx
import pytest
import torch

from compiler_core.build.engine import read_engine_config
from compiler_core.host import Host

pytest.importorskip("onnxruntime")
if "onnx" not in Host.load().registry.backends:
    pytest.skip("the onnx backend plugin is not loaded", allow_module_level=True)

from modelc_plugins.onnx.testing import built_engine, prompt_logits

PROMPTS = [[5, 77, 120, 33, 9, 250, 18, 61, 300, 2, 45, 17, 88, 140, 7, 230], [150, 3, 99, 8, 41, 12]]


# 180b has 40b's graph and falcon2's ops are 7b's and 40b's: three variants cover every lowering.
@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
def test_onnxruntime_equals_torch_backend(variant, fp8_dir, tmp_path):
    """FP8 weights, activations and KV cache: onnxruntime's Q/DQ graph computes what the torch kernels do."""
    ckpt = fp8_dir(variant)
    onnx_logits, real = prompt_logits(built_engine(ckpt, tmp_path / "onnx", "onnx"), PROMPTS)
    torch_logits, _ = prompt_logits(built_engine(ckpt, tmp_path / "torch", "torch"), PROMPTS)
    scale = torch_logits[real].abs().max().item()
    assert (onnx_logits - torch_logits)[real].abs().max().item() < 1e-4 * scale
    assert torch.equal(onnx_logits.argmax(-1)[real], torch_logits.argmax(-1)[real])


def test_onnx_graph_has_per_tensor_fp8_qdq_around_each_matmul(fp8_dir, tmp_path):
    out = built_engine(fp8_dir("40b"), tmp_path / "onnx", "onnx")
    model = onnx.load(str(out / "rank0.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    fp8_weights = {n for n, i in inits.items() if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    graph = read_engine_config(out)["graphs"][0]
    linears = [n for n in graph["nodes"] if n["op"] == "fp8_linear"]
    assert len(linears) == len(fp8_weights) == 8
    assert all(name.endswith(".weight.T") for name in fp8_weights)
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    # Per linear: Q and DQ of the input, DQ of the weight. Per cache tensor (K, V of 2 layers): Q of
    # past + new, DQ of the past (to append in float32) and of the present (to attend).
    assert len(quantize) == len(linears) + 4
    assert len(dequantize) == 2 * len(linears) + 2 * 4
    for node in quantize + dequantize:
        assert len(node.input) == 2  # symmetric: no zero point
        scale = inits[node.input[1]]
        assert scale.dims == [] and scale.data_type == onnx.TensorProto.FLOAT  # per tensor, float32
    for node in quantize:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["output_dtype"] == onnx.TensorProto.FLOAT8E4M3FN and attrs.get("saturate", 1) == 1
    weight_dq = [n for n in dequantize if n.input[0] in fp8_weights]
    assert len(weight_dq) == len(linears)
    float_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and "lm_head.weight.T" in n.input]
    assert len(float_matmuls) == 1  # lm_head stays in full precision


def test_tensor_parallel_onnx_equals_tp1(fp8_dir, tmp_path):
    tp2, real = prompt_logits(built_engine(fp8_dir("7b", tp=2), tmp_path / "tp2", "onnx"), PROMPTS)
    tp1, _ = prompt_logits(built_engine(fp8_dir("7b"), tmp_path / "tp1", "onnx"), PROMPTS)
    assert (tp2 - tp1)[real].abs().max().item() < 1e-4 * tp1[real].abs().max().item()


def test_float16_onnxruntime_close_to_torch_backend(fp8_dir, tmp_path):
    ckpt = fp8_dir("falcon2", dtype="float16")
    onnx_logits, real = prompt_logits(built_engine(ckpt, tmp_path / "onnx", "onnx"), PROMPTS)
    torch_logits, _ = prompt_logits(built_engine(ckpt, tmp_path / "torch", "torch"), PROMPTS)
    # fp16 rounding differs between onnxruntime's kernels and torch's, and an activation that lands on
    # the other side of an FP8 rounding boundary moves by a whole FP8 step.
    assert (onnx_logits - torch_logits)[real].abs().max().item() < 0.05 * torch_logits[real].abs().max().item()
    assert (onnx_logits.argmax(-1) == torch_logits.argmax(-1))[real].float().mean() >= 0.95


@pytest.mark.parametrize(
    ("variant", "dtype", "tp", "kv"),
    [("40b", "float16", 1, "fp8"), ("7b", "bfloat16", 2, None)],
)
def test_tensorrt_parses_and_builds(variant, dtype, tp, kv, fp8_dir, tmp_path):
    from modelc_plugins.tensorrt.testing import build_checkpoint, require_tensorrt

    require_tensorrt()
    config = build_checkpoint(fp8_dir(variant, kv=kv, tp=tp, dtype=dtype), tmp_path / "engine")
    for rank in range(tp):
        steps = config["ranks"][rank]["tensorrt"]["plan"]["steps"]
        engines = [tmp_path / "engine" / s["file"] for s in steps if s["kind"] == "onnx"]
        assert engines and all(e.stat().st_size > 0 for e in engines)
