"""Which weight files a Hugging Face model directory holds, read from its shard index when it has one.

With ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) the index decides:
every shard it names must be in the directory, and every tensor it names must be in that shard.
Without one, the directory's ``*.safetensors`` (else ``*.bin``) files are the weights. Either
way each file must resolve inside the model directory: an index entry cannot point elsewhere by
an absolute path or ``..``, and a symlinked shard may only lead into the directory itself or,
for a Hugging Face cache snapshot (``models--org--name/snapshots/<rev>/``), into that cache
repository (whose snapshot files link to ``../../blobs/<hash>``).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from compiler_core.errors import ConfigError, IndexFileError, UnsafePathError, WeightFileError
from compiler_core.formats.fileio import read_json
from compiler_core.formats.safetensors_header import TensorEntry, open_weights, read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Not weights, though saved as .bin beside them by transformers' Trainer.
_NOT_WEIGHTS = {"training_args.bin"}


def allowed_roots(model_dir: Path) -> list[Path]:
    """The resolved directories that the model's files may resolve into."""
    real = Path(model_dir).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent)
    return roots


def check_inside(path: Path, model_dir: Path) -> None:
    """Refuse ``path`` (UnsafePathError) unless it resolves inside the model directory or its cache repository."""
    target = Path(path).resolve()
    if not any(target.is_relative_to(root) for root in allowed_roots(model_dir)):
        raise UnsafePathError(f"{path}: resolves to {target}, outside the model directory {model_dir}")


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a shard index, checked for shape and safe names."""
    try:
        index = read_json(index_path, "shard index")
    except ConfigError as exc:
        raise IndexFileError(str(exc)) from None
    weight_map: Any = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexFileError(f"{index_path}: field 'weight_map' must be a non-empty object of tensor name -> shard")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise IndexFileError(f"{index_path}: weight_map[{name!r}] must be a shard file name, got {shard!r}")
        parts = PurePosixPath(shard).parts
        if os.path.isabs(shard) or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise UnsafePathError(f"{index_path}: weight_map[{name!r}] = {shard!r} leads outside the model directory")
    return weight_map


def _indexed_files(model_dir: Path, index_path: Path) -> list[Path]:
    weight_map = read_index(index_path)
    # Keyed by the normalised path, so that "one.safetensors" and "./one.safetensors" are one shard, read once.
    by_shard: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(model_dir / PurePosixPath(shard), []).append(name)
    files = []
    for path, names in by_shard.items():
        shard = path.relative_to(model_dir)
        if not path.exists():
            raise IndexFileError(f"{index_path}: shard '{shard}' (holding {names[0]!r}) is not in {model_dir}")
        header = _checked(path, model_dir)
        missing = [n for n in names if header is not None and n not in header]
        if missing:
            raise IndexFileError(f"{index_path}: tensor {missing[0]!r} is not in its shard {shard}")
        files.append(path)
    return sorted(files)


def _checked(path: Path, model_dir: Path) -> dict[str, TensorEntry] | None:
    """Check that weight file ``path`` stays inside the model directory and is a readable regular
    file; return its tensors when it is a safetensors file (its header validated)."""
    check_inside(path, model_dir)
    fd = open_weights(path)
    try:
        return read_header(fd, str(path))[0] if path.suffix == ".safetensors" else None
    finally:
        os.close(fd)


def weight_files(model_dir: Path) -> list[Path]:
    """The model's weight files, in a stable order: from its index when present, else by suffix."""
    model_dir = Path(model_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (model_dir / index_name).is_file():
            return _indexed_files(model_dir, model_dir / index_name)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.glob("*.bin") if p.name not in _NOT_WEIGHTS)
    if not files:
        raise WeightFileError(f"{model_dir}: no *.safetensors or *.bin weight files")
    for path in files:
        _checked(path, model_dir)
    return files
