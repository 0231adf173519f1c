"""Summaries of checkpoint and engine directories for ``modelc inspect``."""

from __future__ import annotations

from pathlib import Path

from compiler_core.build.engine import describe_engine
from compiler_core.errors import UsageError
from compiler_core.formats.checkpoint import read_config
from compiler_core.formats.fileio import read_json
from compiler_core.ir import format_graph
from compiler_core.model import rank_graph
from compiler_core.registry import Registry


def describe(registry: Registry, directory: Path, max_nodes: int | None = 40) -> str:
    """Text summary of a checkpoint or engine directory: header plus each rank's graph listing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: directory not found")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory}: no config.json (not a modelc checkpoint or engine)")
    raw = read_json(directory / "config.json")
    if raw.get("format") == "modelc-engine":
        return describe_engine(registry, directory, raw, max_nodes)
    config = read_config(directory)
    mapping, q = config.mapping, config.quantization
    lines = [
        f"checkpoint {directory}",
        f"  architecture: {config.architecture}  dtype: {config.dtype}  "
        f"mapping: tp={mapping.tp_size} pp={mapping.pp_size} world={mapping.world_size}",
        f"  quantization: quant_algo={q.quant_algo} kv_cache_quant_algo={q.kv_cache_quant_algo}",
    ]
    for rank in mapping.ranks():
        lines.append(
            format_graph(rank_graph(registry, config, rank, str(directory / "config.json")), max_nodes=max_nodes)
        )
    return "\n".join(lines)
