"""The safetensors header, validated before any tensor is touched.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the
data section) plus an optional ``__metadata__`` object of strings. Every reader of modelc goes
through :func:`parse_header`, which accepts exactly what the safetensors format allows: a bounded
header, known dtype names, non-negative integer shapes whose byte size matches the offsets, and
offsets that lie inside the file, never overlap and cover the data with no hole. Anything else
is a :class:`WeightFileError` naming the file and the entry, so a mutated or hostile header can
neither crash a reader nor be read as different weights.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any

import torch

from compiler_core.dtypes import ELEMENT_TYPES, from_safetensors_code
from compiler_core.errors import WeightFileError

#: The safetensors library refuses longer headers; so does modelc, before reading them.
MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_METADATA = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: byte offsets ``begin``..``end`` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return from_safetensors_code(self.dtype)


def header_length(prefix: bytes, file_size: int, source: str) -> int:
    """The JSON length N from a file's first 8 bytes, checked against the file's size."""
    if len(prefix) < 8:
        raise WeightFileError(f"{source}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(prefix[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise WeightFileError(
            f"{source}: not a safetensors file (header length {n} does not fit a {file_size}-byte file "
            f"and the {MAX_HEADER_BYTES}-byte limit)"
        )
    return n


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WeightFileError(f"entry {key!r} appears twice")
        out[key] = value
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, info: Any, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightFileError(f"{where}: header entry must be an object, got {type(info).__name__}")
    if set(info) != _ENTRY_KEYS:
        raise WeightFileError(f"{where}: header entry must have exactly the keys dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    torch_dtype = from_safetensors_code(dtype) if isinstance(dtype, str) else None
    if torch_dtype is None:
        codes = ", ".join(t.safetensors for t in ELEMENT_TYPES)
        raise WeightFileError(f"{where}: dtype {dtype!r} is not a safetensors dtype ({codes})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise WeightFileError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise WeightFileError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    nbytes = math.prod(shape) * torch_dtype.itemsize
    if end - begin != nbytes:
        raise WeightFileError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes, but {dtype} {shape} needs {nbytes}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def parse_header(raw: bytes, file_size: int, source: str) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, from its JSON header ``raw`` (the N bytes after the
    length) and the file's total size; refuses every header the format does not allow."""
    data_size = file_size - 8 - len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except WeightFileError as exc:
        raise WeightFileError(f"{source}: header {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise WeightFileError(f"{source}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{source}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightFileError(f"{source}: header field {_METADATA!r} must be an object of strings")
    entries = {name: _entry(name, info, source) for name, info in header.items()}
    covered = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != covered:
            problem = "overlaps the tensor before it" if entry.begin < covered else f"leaves a hole at byte {covered}"
            raise WeightFileError(f"{source}: tensor {name!r}: data_offsets [{entry.begin}, {entry.end}] {problem}")
        covered = entry.end
    if covered != data_size:
        raise WeightFileError(
            f"{source}: tensors cover {covered} bytes of data, but the file holds {data_size} after its header"
        )
    return entries


def read_header(fd: int, source: str) -> tuple[dict[str, TensorEntry], int]:
    """(tensors, offset of the data section) of the open safetensors file ``fd``."""
    file_size = os.fstat(fd).st_size
    n = header_length(os.pread(fd, 8, 0), file_size, source)
    return parse_header(os.pread(fd, n, 8), file_size, source), 8 + n


def open_weights(path: os.PathLike | str) -> int:
    """A read-only descriptor of the regular file ``path``; anything else is a WeightFileError.

    Opened non-blocking so that a FIFO or device in place of a shard is refused instead of
    waiting forever for a writer (the flag changes nothing for a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WeightFileError(f"{path}: not a regular file")
    return fd


def tensors_of(path: os.PathLike | str) -> dict[str, TensorEntry]:
    """The validated header of the safetensors file ``path``: its tensors, without reading their data."""
    fd = open_weights(path)
    try:
        return read_header(fd, str(path))[0]
    finally:
        os.close(fd)
