"""The files an onnx build writes, what `modelc inspect` shows of them, and the CLI path."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from compiler_core.build.engine import choose_backend
from compiler_core.cli import cli
from compiler_core.errors import ModelcError
from compiler_core.formats.inspect import describe
from compiler_core.ir import GraphBuilder
from modelc_plugins.onnx.export import export_rank
from modelc_plugins.onnx.lowering import ALIGN_LARGE, ALIGN_LARGE_THRESHOLD, OPSET
from modelc_plugins.onnx.testing import local_runner


def test_rank_file_is_valid_onnx_with_external_weights(falcons):
    engine = falcons.engine("falcon2", "onnx")
    path = engine / "rank0.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert names[3:] == [f"past_{kind}.layer{i}" for i in range(3) for kind in ("key", "value")]
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "lm_head.out" and outputs[1:] == [
        f"present_{k}.layer{i}" for i in range(3) for k in ("key", "value")
    ]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "seq"] and dims["past_key.layer0"] == ["batch", 2, "past_seq", 8]
    # Every weight of the checkpoint went to the data file; only small constants stay inline.
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "embed.weight" in external and "lm_head.weight.T" in external
    assert all(t.raw_data == b"" or len(t.raw_data) < 1024 for t in model.graph.initializer)
    assert path.stat().st_size < 64 * 1024
    # All references point into the one data file and lie inside it.
    size = (engine / "rank0.onnx.data").stat().st_size
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "rank0.onnx.data"
            assert int(info["offset"]) + int(info["length"]) <= size


def test_large_tensors_are_page_aligned(registry, tmp_path):
    g = GraphBuilder("big")
    w = g.param("w", [4096, 96], "float32")  # 1.5 MiB: above the alignment threshold
    x = g.add("embedding", ["input_ids"], name="embed", params={"weight": g.param("e", [10, 96], "float32")})
    y = g.add("linear", [x], name="fc", params={"weight": w})
    graph = g.build(["input_ids"], [y], attrs={"dtype": "float32"})
    weights = {"w": torch.randn(4096, 96), "e": torch.randn(10, 96)}
    export_rank(registry, graph, weights, tmp_path, 0)
    model = onnx.load(str(tmp_path / "rank0.onnx"), load_external_data=False)
    offsets = {
        t.name: int({e.key: e.value for e in t.external_data}["offset"])
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert 4096 * 96 * 4 >= ALIGN_LARGE_THRESHOLD and offsets["w.T"] % ALIGN_LARGE == 0
    loaded = onnx.load(str(tmp_path / "rank0.onnx"))  # resolves the external data
    w_t = next(t for t in loaded.graph.initializer if t.name == "w.T")
    assert torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(w_t).copy()), weights["w"].t())


def test_inspect_shows_each_segment(registry, falcons):
    text = describe(registry, falcons.engine("rw", "onnx", tp=2), max_nodes=0)
    assert "backend onnx" in text
    assert f"onnx: opset {OPSET}, 7 segment(s), external data rank1.onnx.data" in text
    assert "rank1.seg6.onnx:" in text and "all_gather(lm_head.out) -> lm_head.all_gather.out axis=-1" in text
    assert "ops: Add×" in text and "LayerNormalization×" in text
    assert "inputs: layers.0.attention.all_reduce.out:float32[batch,seq,64]" in text


def test_onnx_is_never_the_default_backend():
    backend, reason = choose_backend(None)
    assert backend.name != "onnx"
    assert "onnx (never the default" in reason


def test_cli_build_run_matches_torch_engine(falcons, tmp_path):
    ckpt = falcons.checkpoint("7b")
    runner = CliRunner()
    outputs = {}
    for backend in ("onnx", "torch"):
        engine = tmp_path / backend
        result = runner.invoke(
            cli, ["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--backend", backend]
        )
        assert result.exit_code == 0, result.output
        assert f"backend: {backend}" in result.output
        out = tmp_path / f"{backend}.json"
        args = ["run", "--engine_dir", str(engine), "--max_output_len", "6", "--output_json", str(out)]
        result = runner.invoke(
            cli, [*args, "--input_text", "Cooking rice", "--input_text", "The weather in the valley"]
        )
        assert result.exit_code == 0, result.output
        outputs[backend] = json.loads(out.read_text())
    assert outputs["onnx"] == outputs["torch"]
    assert len(outputs["onnx"]["output_ids"]) == 2


def test_bfloat16_engine_on_the_cpu_provider_is_one_clear_error(falcons):
    engine = falcons.engine("rw", "onnx", "bfloat16", layers=1)
    with pytest.raises(ModelcError, match=r"rank0\.onnx: onnxruntime cannot load it: .*no bfloat16 MatMul"):
        local_runner(engine)
