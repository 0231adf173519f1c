"""The ``tensorrt`` backend: each rank's ONNX (from the onnx plugin's lowering) built into TensorRT engines."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from compiler_core.api import Backend
from compiler_core.build.engine import engine_graph
from compiler_core.errors import ConfigError
from compiler_core.ir import Graph
from compiler_core.registry import Registry
from modelc_plugins.tensorrt.package import (
    INSTALL_HINT,
    can_build_reason,
    describe_package,
    gpu_reason,
    import_tensorrt,
)

#: Preference when a TensorRT package imports and a GPU that runs its engines is present
#: (above torch's 0); otherwise -1, never the default.
PREFERRED = 10


def engine_file(onnx_file: str) -> str:
    """``rank0.seg1.onnx`` -> ``rank0.seg1.engine``."""
    return onnx_file.removesuffix(".onnx") + ".engine"


class TensorRTBackend(Backend):
    name = "tensorrt"
    description = (
        "TensorRT engines built from the ONNX graphs (strongly typed; tensorrt or tensorrt_rtx, "
        "which builds without a GPU)."
    )

    def unavailable_reason(self) -> str | None:
        trt = import_tensorrt()
        if trt is None:
            return INSTALL_HINT
        if importlib.util.find_spec("onnx") is None:
            return "the tensorrt backend lowers through ONNX: pip install onnx"
        return can_build_reason(trt)

    def preference(self) -> int:
        trt = import_tensorrt()
        if trt is None or self.unavailable_reason() is not None or gpu_reason(trt) is not None:
            return -1
        return PREFERRED

    def preference_reason(self) -> str:
        trt = import_tensorrt()
        if trt is None:
            return INSTALL_HINT
        reason = self.unavailable_reason() or gpu_reason(trt)
        if reason is None:
            return f"{describe_package(trt)} imports and {torch.cuda.get_device_name()} runs its engines"
        return f"{describe_package(trt)} imports but {reason}"

    def build_rank(
        self,
        graph: Graph,
        weights: dict[str, torch.Tensor],
        out_dir: Path,
        rank: int,
        settings: dict[str, Any],
        registry: Registry,
    ) -> dict[str, Any]:
        from modelc_plugins.onnx.export import export_rank
        from modelc_plugins.tensorrt.builder import build_serialized

        with tempfile.TemporaryDirectory(prefix=f"rank{rank}.onnx.", dir=out_dir) as tmp:
            plan = export_rank(registry, graph, weights, Path(tmp), rank)
            for step in plan.steps:
                if step.file is None:
                    continue
                data = build_serialized(Path(tmp) / step.file, step.types, settings)
                step.file = engine_file(step.file)
                (Path(out_dir) / step.file).write_bytes(data)
        # Engines embed their weights: no external data file travels with them.
        plan.data_file, plan.data_bytes = "", 0
        return {"tensorrt": {"package": describe_package(import_tensorrt()), "plan": plan.to_json()}}

    def load_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int, device: str, registry: Registry):
        from modelc_plugins.tensorrt.session import TensorRTSession

        plan = self._plan(engine_dir, engine_config, rank)
        graph = engine_graph(registry, engine_config, rank)
        return TensorRTSession(engine_dir, graph, plan, engine_config["build"], device)

    def describe_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int) -> str:
        plan = self._plan(engine_dir, engine_config, rank)
        package = engine_config["ranks"][rank]["tensorrt"]["package"]
        sizes = ", ".join(f"{f} ({(Path(engine_dir) / f).stat().st_size / 2**20:.2f} MiB)" for f in plan.files)
        build = engine_config["build"]
        return (
            f"  tensorrt: built by {package}; profiles: prompt (seq 1..{build['max_input_len']}, no past), "
            f"decode (1 token after up to {build['max_seq_len'] - 1}); batch 1..{build['max_batch_size']}\n"
            f"    engines: {sizes}"
        )

    @staticmethod
    def _plan(engine_dir: Path, engine_config: dict[str, Any], rank: int):
        from modelc_plugins.onnx.export import RankPlan

        source = str(Path(engine_dir) / "config.json")
        try:
            facts = engine_config["ranks"][rank]["tensorrt"]
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"{source}: rank {rank} has no TensorRT plan (field 'ranks[{rank}].tensorrt')") from None
        return RankPlan.from_json(facts["plan"], source)
