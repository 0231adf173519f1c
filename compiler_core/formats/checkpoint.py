"""The checkpoint directory: ``config.json`` + ``rank{r}.safetensors`` (r = pp_rank * tp_size + tp_rank)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from pathlib import Path
from typing import Any

import torch

from compiler_core.dtypes import MODEL_DTYPES
from compiler_core.errors import UsageError
from compiler_core.formats.fileio import OutputKind, read_json, write_json
from compiler_core.formats.safetensors_io import SafetensorsReader, SafetensorsWriter
from compiler_core.mapping import Mapping

FORMAT = "modelc-checkpoint"
FORMAT_VERSION = 1
#: What convert and quantize write; only an earlier checkpoint (or an empty directory) is replaced.
CHECKPOINT_OUTPUT = OutputKind("modelc checkpoint", FORMAT)
TOKENIZER_DIR = "tokenizer"
REQUIRED_FIELDS = ("architecture", "dtype", "mapping", "quantization", "format_version")

NO_QUANTIZATION: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}


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


def make_config(
    model_config: dict[str, Any], dtype: str, mapping: Mapping, quantization: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A checkpoint config.json: the model's fields plus dtype, mapping, quantization and format."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model_config,
        "dtype": dtype,
        "mapping": mapping.to_json(),
        "quantization": {**NO_QUANTIZATION, **(quantization or {})},
    }


def write_config(directory: Path, config: dict[str, Any]) -> None:
    """Write ``config`` as ``directory/config.json``."""
    write_json(Path(directory) / "config.json", config)


def read_config(directory: Path) -> dict[str, Any]:
    """Read and validate a checkpoint's config.json; errors name the file and field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: checkpoint directory not found")
    path = directory / "config.json"
    config = read_json(path, "checkpoint config")
    if config.get("format", FORMAT) != FORMAT:
        raise UsageError(f"{path}: field 'format' is {config['format']!r}, not a {FORMAT} directory")
    for field in REQUIRED_FIELDS:
        if field not in config:
            raise UsageError(f"{path}: field {field!r} is missing")
    if config["format_version"] != FORMAT_VERSION:
        raise UsageError(f"{path}: format_version {config['format_version']!r} is not {FORMAT_VERSION}")
    if config["dtype"] not in MODEL_DTYPES:
        raise UsageError(f"{path}: field 'dtype' is {config['dtype']!r}, expected one of {', '.join(MODEL_DTYPES)}")
    if not isinstance(config["quantization"], dict):
        raise UsageError(f"{path}: field 'quantization' must be an object")
    mapping = Mapping.from_json(config["mapping"], str(path))
    missing = [r for r in mapping.ranks() if not rank_file(directory, r).is_file()]
    if missing:
        raise UsageError(
            f"{directory}: rank{missing[0]}.safetensors is missing (mapping has world_size {mapping.world_size})"
        )
    return config


def mapping_of(config: dict[str, Any]) -> Mapping:
    """The parallel mapping a (validated) checkpoint config describes."""
    return Mapping.from_json(config["mapping"])
