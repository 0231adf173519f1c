"""The ``onnx`` backend: each rank lowered to ONNX files + external weights, run with onnxruntime."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from compiler_core.api import Backend
from compiler_core.build.engine import engine_graph
from compiler_core.errors import ConfigError
from compiler_core.ir import Graph
from compiler_core.registry import Registry


def rank_plan(engine_config: dict[str, Any], rank: int, source: str = "engine config.json"):
    """The :class:`~modelc_plugins.onnx.export.RankPlan` recorded for ``rank`` at build time."""
    from modelc_plugins.onnx.export import RankPlan

    try:
        facts = engine_config["ranks"][rank]["onnx"]
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"{source}: rank {rank} has no ONNX plan (field 'ranks[{rank}].onnx')") from None
    return RankPlan.from_json(facts, source)


class OnnxBackend(Backend):
    name = "onnx"
    description = "ONNX graphs (opset 22, external weights, KV cache as I/O) run with onnxruntime."

    def unavailable_reason(self) -> str | None:
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed: pip install 'modelc[onnx]' (onnx onnxruntime)"
        return None

    def preference(self) -> int:
        # Never the default: onnxruntime on CPU is slower than the torch backend, which runs everywhere.
        return -1

    def preference_reason(self) -> str:
        return "never the default: ask for it with --backend onnx"

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

        plan = export_rank(registry, graph, weights, out_dir, rank)
        return {"onnx": plan.to_json()}

    def load_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int, device: str, registry: Registry):
        from modelc_plugins.onnx.session import OnnxSession

        source = str(Path(engine_dir) / "config.json")
        graph = engine_graph(registry, engine_config, rank)
        return OnnxSession(engine_dir, graph, rank_plan(engine_config, rank, source), device)

    def describe_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int) -> str:
        from modelc_plugins.onnx.summary import describe_plan

        return describe_plan(Path(engine_dir), rank_plan(engine_config, rank))
