"""The torch backend: per-rank safetensors executed by the reference executor (CPU or CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compiler_core.api import Backend
from compiler_core.build.engine import engine_graph
from compiler_core.formats.checkpoint import check_rank_file, rank_file, save_rank_weights
from compiler_core.ir import Graph
from compiler_core.registry import Registry
from compiler_core.runtime.loading import load_weights_for
from compiler_core.runtime.session import TorchSession


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch executor: runs everywhere (CPU included); the fast path on NVIDIA GPUs."

    def preference(self) -> int:
        return 0

    def build_rank(
        self,
        graph: Graph,
        weights: dict[str, torch.Tensor],
        out_dir: Path,
        rank: int,
        settings: dict[str, Any],
        registry: Registry,
    ):
        save_rank_weights(rank_file(out_dir, rank), {name: weights[name] for name in graph.params})
        return {"weights": rank_file(out_dir, rank).name}

    def load_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int, device: str, registry: Registry):
        graph = engine_graph(registry, engine_config, rank)
        check_rank_file(rank_file(engine_dir, rank), graph.params)  # a missing or mistyped tensor is bad input
        return TorchSession(registry, graph, load_weights_for(rank_file(engine_dir, rank), device), device)
