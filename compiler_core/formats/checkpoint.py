"""The checkpoint directory: ``config.json`` + ``rank{r}.safetensors`` (r = pp_rank * tp_size + tp_rank)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from pathlib import Path
from typing import Any

import torch

from compiler_core.dtypes import torch_dtype
from compiler_core.errors import UsageError, WeightFileError
from compiler_core.formats.checkpoint_config import FORMAT, CheckpointConfig
from compiler_core.formats.fileio import OutputKind, read_json, write_json
from compiler_core.formats.safetensors_header import tensors_of
from compiler_core.formats.safetensors_io import SafetensorsReader, SafetensorsWriter

#: What convert and quantize write; only an earlier checkpoint (or an empty directory) is replaced.
CHECKPOINT_OUTPUT = OutputKind("modelc checkpoint", FORMAT)
TOKENIZER_DIR = "tokenizer"


def rank_file(directory: Path, rank: int, suffix: str = "safetensors") -> Path:
    """The path of rank ``rank``'s file in ``directory``."""
    return Path(directory) / f"rank{rank}.{suffix}"


def save_rank_weights(path: Path, weights: AbcMapping[str, torch.Tensor]) -> None:
    """Save one rank's tensors; tensors that share storage (tied weights) are each stored in full."""
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in weights.items()}
    with SafetensorsWriter(path, layout, Path(path).name, threads=1) as writer:
        for name, tensor in weights.items():
            writer.write(name, tensor)


def load_rank_weights(
    path: Path, each: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Load one rank's tensors as views of a copy-on-write mapping of the file; a missing or unreadable
    file is a UsageError naming it.

    ``each`` maps every tensor as it is read (the runtime uses it to hold weights compactly); each
    tensor's pages are dropped once it is mapped, so that only one tensor at a time is ever held in
    both forms."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: rank weights not found")
    reader = SafetensorsReader(path)
    try:
        if each is None:
            return {name: reader.tensor(name) for name in reader.names()}
        out = {}
        for name in reader.names():
            held = each(reader.tensor(name))
            if held.untyped_storage().data_ptr() == reader.base:
                held = held.clone()  # ``each`` kept the view: copy it out before its pages go
            reader.release(name)
            out[name] = held
        return out
    finally:
        reader.close()


def write_config(directory: Path, config: CheckpointConfig) -> None:
    """Write ``config`` as ``directory/config.json``."""
    write_json(Path(directory) / "config.json", config.to_json())


def read_config(directory: Path) -> CheckpointConfig:
    """Read and validate a checkpoint's config.json, checking that every rank file its mapping names
    is there; errors name the file and field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: checkpoint directory not found")
    path = directory / "config.json"
    config = CheckpointConfig.from_json(read_json(path, "checkpoint config"), str(path))
    missing = [r for r in config.mapping.ranks() if not rank_file(directory, r).is_file()]
    if missing:
        raise UsageError(
            f"{directory}: rank{missing[0]}.safetensors is missing (mapping has world_size {config.mapping.world_size})"
        )
    return config


def check_rank_file(path: Path, params: AbcMapping[str, Any]) -> None:
    """Check a rank file's header against the graph's parameters (name -> IR ``Param``), before it is read."""
    if not Path(path).is_file():
        raise WeightFileError(f"{path}: rank weights not found")
    header = tensors_of(path)
    for name, param in params.items():
        entry = header.get(name)
        if entry is None:
            raise WeightFileError(f"{path}: tensor {name!r} is missing (the rank's graph reads it)")
        if entry.shape != tuple(param.shape) or entry.torch_dtype != torch_dtype(param.dtype):
            raise WeightFileError(
                f"{path}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, the rank's graph wants "
                f"{param.dtype} {list(param.shape)}"
            )
