"""Real TensorRT engines built on this machine (TensorRT-RTX needs no GPU) for every Falcon variant."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from compiler_core.errors import ModelcError
from modelc_plugins.onnx.testing import mixed_graph
from modelc_plugins.tensorrt.builder import DECODE_PROFILE, PROMPT_PROFILE, build_serialized, profile_ranges
from modelc_plugins.tensorrt.testing import TEST_SETTINGS, build_checkpoint, build_graph, require_tensorrt

pytestmark = pytest.mark.usefixtures("trt")


@pytest.fixture(scope="module")
def trt():
    return require_tensorrt()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["rw", "7b", "40b", "falcon2"])
def test_every_variant_builds(falcons, tmp_path, variant, dtype):
    # One decoder layer holds every op of the variant; build time grows with the layer count.
    ckpt = falcons.checkpoint(variant, dtype, layers=1)
    config = build_checkpoint(ckpt, tmp_path / "engine")
    engine = tmp_path / "engine" / "rank0.engine"
    weights = (ckpt / "rank0.safetensors").stat().st_size
    assert engine.stat().st_size > weights  # the engine embeds the weights
    facts = config["ranks"][0]["tensorrt"]
    assert facts["package"].startswith(("tensorrt_rtx ", "tensorrt "))
    assert [s["file"] for s in facts["plan"]["steps"]] == ["rank0.engine"]
    assert not list((tmp_path / "engine").glob("*.onnx*"))  # the intermediate ONNX is not kept


def test_tensor_parallel_ranks_build_one_engine_per_segment(falcons, tmp_path):
    build_checkpoint(falcons.checkpoint("40b", "float16", tp=2, layers=1), tmp_path / "engine")
    config = json.loads((tmp_path / "engine" / "config.json").read_text())
    for rank in (0, 1):
        steps = config["ranks"][rank]["tensorrt"]["plan"]["steps"]
        files = [s["file"] for s in steps if s["kind"] == "onnx"]
        # 40b: one all-reduce per layer (attention + MLP summed first), then the vocab all-gather.
        assert [s["kind"] for s in steps] == ["onnx", "all_reduce", "onnx", "all_gather"]
        assert files == [f"rank{rank}.seg{k}.engine" for k in range(2)]
        assert all((tmp_path / "engine" / f).stat().st_size > 0 for f in files)


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv-fp32", "kv-fp8"])
def test_non_falcon_ops_and_fp8_cache_build(registry, tmp_path, kv_fp8):
    """rms_norm, silu/relu/mul, narrow, partial scaled rope, GQA ALiBi and the FP8 KV-cache Q/DQ."""
    graph, weights = mixed_graph(registry, kv_fp8)
    facts = build_graph(graph, weights, tmp_path)
    assert (tmp_path / "rank0.engine").is_file()
    cache = facts["tensorrt"]["plan"]["cache"]
    assert cache["s1"]["dtype"] == ("float8_e4m3fn" if kv_fp8 else "float32")


def test_profiles_are_self_consistent():
    prompt, decode = (profile_ranges(TEST_SETTINGS)[i] for i in (PROMPT_PROFILE, DECODE_PROFILE))
    for ranges in (prompt, decode):
        for k in range(3):  # min, opt, max: past + new tokens = total
            assert ranges["past_seq"][k] + ranges["seq"][k] == ranges["total_seq"][k]
    assert prompt["seq"][2] == TEST_SETTINGS["max_input_len"] and prompt["past_seq"] == (0, 0, 0)
    assert decode["seq"] == (1, 1, 1) and decode["total_seq"][2] == TEST_SETTINGS["max_seq_len"]


def test_parser_errors_fail_the_build(tmp_path):
    """Strong typing: a MatMul of float16 by float32 is rejected, and the error names the node."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [0.5] * 8)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mixed_types")
    model = helper.make_model(
        helper.make_graph([node], "bad", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 22)]
    )
    model.ir_version = 10
    onnx.save_model(model, str(tmp_path / "bad.onnx"))
    from modelc_plugins.onnx.lowering import ValueType

    with pytest.raises(ModelcError, match=r"bad\.onnx: TensorRT's ONNX parser rejected it: node mixed_types"):
        build_serialized(tmp_path / "bad.onnx", {"x": ValueType("float16", ("batch", 4))}, TEST_SETTINGS)
