"""Helpers for tests that build TensorRT engines (this plugin's and the quantization plugins').

Building needs only a TensorRT package (TensorRT-RTX builds on a machine without a GPU), so a
test can parse and build a real engine from any checkpoint, engine directory or bare IR graph
and fail on parse errors or unsupported ops; only running an engine needs a supported GPU.

In another plugin's tests::

    from modelc_plugins.tensorrt.testing import build_checkpoint, build_graph, require_tensorrt

    def test_fp8_graph_builds_in_tensorrt(tmp_path, fp8_checkpoint):
        require_tensorrt()
        config = build_checkpoint(fp8_checkpoint, tmp_path / "engine")
        assert (tmp_path / "engine" / "rank0.engine").is_file()
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from compiler_core.host import load_registry
from compiler_core.ir import Graph
from modelc_plugins.tensorrt.package import INSTALL_HINT, gpu_reason, import_tensorrt

#: Small limits keep test builds fast; engines accept any shape inside them.
TEST_SETTINGS = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64}


def require_tensorrt():
    """The TensorRT module, or skip the calling test saying what to install."""
    trt = import_tensorrt()
    if trt is None:
        pytest.skip(INSTALL_HINT)
    return trt


def run_skip_reason() -> str | None:
    """None when engines can be executed here, else why tests that run them skip."""
    trt = import_tensorrt()
    if trt is None:
        return INSTALL_HINT
    reason = gpu_reason(trt)
    return None if reason is None else f"executing TensorRT engines needs a supported GPU: {reason}"


def build_checkpoint(checkpoint_dir: Path, out_dir: Path, **settings: Any) -> dict[str, Any]:
    """``modelc build --backend tensorrt`` of a checkpoint (any quantization); returns the engine config.

    Raises ModelcError naming the ONNX file and TensorRT's first parser/builder error.
    """
    from compiler_core.build.engine import build_engine

    registry = load_registry()
    backend = registry.backend("tensorrt", "test")
    return build_engine(
        checkpoint_dir, out_dir, backend, {**TEST_SETTINGS, **settings}, show_progress=False, registry=registry
    )


def build_graph(
    graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path, rank: int = 0, **settings: Any
) -> dict[str, Any]:
    """Lower one rank's IR graph through the onnx plugin and build its engine(s) into ``out_dir``.

    Returns the rank's facts (``{"tensorrt": {"package", "plan"}}``) as an engine config records them.
    """
    from modelc_plugins.tensorrt.backend import TensorRTBackend

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**TEST_SETTINGS, **settings}
    return TensorRTBackend().build_rank(graph, dict(weights), out_dir, rank, settings, load_registry())
