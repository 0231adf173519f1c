"""The checkpoint directory: ``config.json`` + ``rank{r}.safetensors`` (r = pp_rank * tp_size + tp_rank)."""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping as AbcMapping
from pathlib import Path
from typing import Any

import torch

from compiler_core.dtypes import MODEL_DTYPES, torch_dtype
from compiler_core.errors import ConfigError, UsageError, WeightFileError
from compiler_core.formats.fields import int_field, is_int
from compiler_core.formats.fileio import OutputKind, read_json, write_json
from compiler_core.formats.safetensors_header import open_weights, read_header
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


def check_config(config: dict[str, Any], source: str) -> Mapping:
    """Check a checkpoint config's own fields (format, version, dtype, quantization, mapping); return its mapping.

    The architecture's fields are checked where they are used, by building each rank's graph."""
    if config.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{source}: field 'format' is {config['format']!r}, not a {FORMAT} directory")
    for field in REQUIRED_FIELDS:
        if field not in config:
            raise ConfigError(f"{source}: field {field!r} is missing")
    version = config["format_version"]
    if not is_int(version) or version != FORMAT_VERSION:
        raise ConfigError(f"{source}: format_version {version!r} is not {FORMAT_VERSION}")
    if not isinstance(config["architecture"], str):
        raise ConfigError(f"{source}: field 'architecture' must be a string, got {config['architecture']!r}")
    if not isinstance(config["dtype"], str) or config["dtype"] not in MODEL_DTYPES:
        raise ConfigError(f"{source}: field 'dtype' is {config['dtype']!r}, expected one of {', '.join(MODEL_DTYPES)}")
    quantization = config["quantization"]
    if not isinstance(quantization, dict):
        raise ConfigError(f"{source}: field 'quantization' must be an object")
    for field in NO_QUANTIZATION:
        if not isinstance(quantization.get(field), (str, type(None))):
            raise ConfigError(f"{source}: field 'quantization.{field}' must be a string or null")
    try:
        int_field(quantization, "group_size", default=None, minimum=1)
    except ValueError as exc:
        raise ConfigError(f"{source}: quantization {exc}") from None
    return Mapping.from_json(config["mapping"], source)


def read_config(directory: Path) -> dict[str, Any]:
    """Read and validate a checkpoint's config.json; errors name the file and field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: checkpoint directory not found")
    path = directory / "config.json"
    config = read_json(path, "checkpoint config")
    mapping = check_config(config, str(path))
    missing = [r for r in mapping.ranks() if not rank_file(directory, r).is_file()]
    if missing:
        raise UsageError(
            f"{directory}: rank{missing[0]}.safetensors is missing (mapping has world_size {mapping.world_size})"
        )
    return config


def check_rank_file(path: Path, params: AbcMapping[str, Any]) -> None:
    """Check a rank file's header against the graph's parameters (name -> IR ``Param``), before it is read."""
    if not Path(path).is_file():
        raise WeightFileError(f"{path}: rank weights not found")
    fd = open_weights(path)
    try:
        header, _ = read_header(fd, str(path))
    finally:
        os.close(fd)
    for name, param in params.items():
        entry = header.get(name)
        if entry is None:
            raise WeightFileError(f"{path}: tensor {name!r} is missing (the rank's graph reads it)")
        if entry.shape != tuple(param.shape) or entry.torch_dtype != torch_dtype(param.dtype):
            raise WeightFileError(
                f"{path}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, the rank's graph wants "
                f"{param.dtype} {list(param.shape)}"
            )


def mapping_of(config: dict[str, Any]) -> Mapping:
    """The parallel mapping a (validated) checkpoint config describes."""
    return Mapping.from_json(config["mapping"])
