"""int4_awq through the onnx backend (run by onnxruntime) and TensorRT (parsed and built here)."""

from __future__ import annotations

import onnx
import pytest
import torch

from compiler_core.build.engine import read_engine_config
from compiler_core.host import Host
from modelc_plugins.quant_awq.testing import GROUP_SIZE

pytest.importorskip("onnxruntime")
if "onnx" not in Host.load().registry.backends:
    pytest.skip("the onnx backend plugin is not loaded", allow_module_level=True)

from modelc_plugins.onnx.testing import built_engine, prompt_logits

PROMPTS = [[5, 77, 120, 33, 9, 250, 18, 61, 300, 2, 45, 17], [150, 3, 99, 8]]


# 180b has 40b's graph and falcon2's ops are 7b's and 40b's: three variants cover every lowering.
@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
def test_onnxruntime_equals_torch_backend(variant, awq_dir, tmp_path) -> None:
    ckpt = awq_dir(variant)
    onnx_logits, real = prompt_logits(built_engine(ckpt, tmp_path / "onnx", "onnx"), PROMPTS)
    torch_logits, _ = prompt_logits(built_engine(ckpt, tmp_path / "torch", "torch"), PROMPTS)
    assert (onnx_logits - torch_logits)[real].abs().max().item() < 1e-4


def test_onnx_graph_uses_blocked_int4_dequantize(awq_dir, tmp_path) -> None:
    """Each quantized linear is int4 W[in, out] -> DequantizeLinear(axis 0, block = group) -> MatMul,
    with the prequant multiply only where the checkpoint has one; lm_head stays a float MatMul."""
    out = built_engine(awq_dir("40b"), tmp_path / "onnx", "onnx")
    model = onnx.load(str(out / "rank0.onnx"), load_external_data=False)
    int4 = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    graph = read_engine_config(out)["graphs"][0]
    awq_nodes = [n for n in graph["nodes"] if n["op"] == "awq_linear"]
    assert len(dq) == len(awq_nodes) == 8
    for node in dq:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": GROUP_SIZE}
        assert len(node.input) == 2  # symmetric: no zero point
        weight = int4[node.input[0]]
        assert weight.name.endswith(".weight.T") and weight.dims[0] % GROUP_SIZE == 0
    consumers = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    assert all(n.output[0] in consumers for n in dq)
    prequant = [n for n in model.graph.node if n.op_type == "Mul" and any("prequant" in i for i in n.input)]
    assert len(prequant) == 2  # the two MLP down projections


def test_tensor_parallel_onnx_equals_tp1(awq_dir, tmp_path) -> None:
    tp2, real = prompt_logits(built_engine(awq_dir("40b", tp=2), tmp_path / "tp2", "onnx"), PROMPTS)
    tp1, _ = prompt_logits(built_engine(awq_dir("40b"), tmp_path / "tp1", "onnx"), PROMPTS)
    assert (tp2 - tp1)[real].abs().max().item() < 1e-4


def test_float16_onnxruntime_close_to_torch_backend(awq_dir, tmp_path) -> None:
    ckpt = awq_dir("7b", dtype="float16")
    onnx_logits, real = prompt_logits(built_engine(ckpt, tmp_path / "onnx", "onnx"), PROMPTS)
    torch_logits, _ = prompt_logits(built_engine(ckpt, tmp_path / "torch", "torch"), PROMPTS)
    # fp16 rounding differs between onnxruntime's kernels and torch's (as for unquantized models).
    assert (onnx_logits - torch_logits)[real].abs().max().item() < 5e-2
    assert torch.equal(onnx_logits.argmax(-1)[real], torch_logits.argmax(-1)[real])


@pytest.mark.parametrize(("variant", "dtype"), [("40b", "float16"), ("rw", "bfloat16")])
def test_tensorrt_parses_and_builds(variant, dtype, awq_dir, tmp_path) -> None:
    """TensorRT's ONNX parser accepts the blocked INT4 DequantizeLinear in a strongly typed network
    and the builder makes an engine (TensorRT-RTX builds without a GPU; running one needs a GPU)."""
    from modelc_plugins.tensorrt.testing import build_checkpoint, require_tensorrt

    require_tensorrt()
    config = build_checkpoint(awq_dir(variant, dtype=dtype), tmp_path / "engine")
    steps = config["ranks"][0]["tensorrt"]["plan"]["steps"]
    assert [s["file"] for s in steps] == ["rank0.engine"]
    assert (tmp_path / "engine" / "rank0.engine").stat().st_size > 0
