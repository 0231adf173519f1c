"""Runners for a checkpoint directory (verify, calibration) and for one rank of it."""

from __future__ import annotations

from pathlib import Path

import torch

from compiler_core.backends.torch.cpu_linear import bf16_kernel, held_for_cpu
from compiler_core.formats.checkpoint import load_rank_weights, rank_file, read_config
from compiler_core.host import load_registry
from compiler_core.model import rank_graph
from compiler_core.registry import Registry
from compiler_core.runtime.runner import LocalRunner
from compiler_core.runtime.session import TorchSession


def checkpoint_runner(checkpoint_dir: Path, device: str = "cpu", registry: Registry | None = None) -> LocalRunner:
    """Every rank of a checkpoint in this process, combined as the parallel run combines them.

    ``registry`` holds the plugins to use (default: the installed ones, loaded for this call).
    """
    registry = registry or load_registry()
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    sessions = [
        TorchSession(
            registry,
            rank_graph(registry, config, rank, str(checkpoint_dir / "config.json")),
            load_weights_for(rank_file(checkpoint_dir, rank), device),
            device,
        )
        for rank in config.mapping.ranks()
    ]
    return LocalRunner(sessions, config.mapping)


def load_weights_for(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A rank file's weights for a torch session on ``device``. Where the CPU holds some weights as
    bfloat16 (see :func:`held_for_cpu`), each is converted as it is read, so the float32 and
    bfloat16 copies of the whole model never coexist; elsewhere the file is simply mapped."""
    each = held_for_cpu if torch.device(device).type == "cpu" and bf16_kernel() is not None else None
    return load_rank_weights(path, each)
