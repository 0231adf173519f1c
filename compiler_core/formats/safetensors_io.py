"""safetensors files as modelc reads and writes them: one reader, one writer, no copies in between.

* :class:`SafetensorsReader` memory-maps a file copy-on-write, validates its header once
  (:mod:`compiler_core.formats.safetensors_header`) and hands
  out tensors as views of the mapping; it can say where a tensor's bytes lie in the file.
* :class:`SafetensorsWriter` lays a file out from every tensor's dtype and shape before any byte is
  written, then stores tensors as they come, file to file with ``copy_file_range`` when a reader
  locates one as an unchanged byte range (so those bytes never enter this process).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import mmap
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from compiler_core.dtypes import safetensors_code
from compiler_core.errors import ModelcError
from compiler_core.formats.safetensors_header import open_weights, read_header

#: Linux moves at most this many bytes per read/write/copy_file_range call.
_IO_CHUNK = 1 << 30


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[:_IO_CHUNK], offset)
        data, offset = data[n:], offset + n


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> bool:
    """Copy ``count`` bytes file to file inside the kernel; False when the system can't."""
    try:
        while count:
            n = os.copy_file_range(src_fd, dst_fd, min(count, _IO_CHUNK), src_offset, dst_offset)
            if n == 0:
                return False
            src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n
    except (OSError, AttributeError):
        return False
    return True


def io_threads() -> int:
    """Threads that move bytes for one writer: the copies release the GIL, so they overlap with
    each other and with the main thread's mapping and sharding."""
    return max(1, min(4, os.cpu_count() or 1))


class ByteSource(Protocol):
    """Something that can tell where a tensor's bytes lie in an open file (a set of readers)."""

    def locate(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(file descriptor, offset) of ``t``'s bytes, or None when they are not an unchanged file range."""


class SafetensorsReader:
    """A safetensors file, memory-mapped copy-on-write: tensors are views of its pages.

    Writing into a tensor copies that page privately (the file is never modified), so callers
    may update weights in place. ``locate`` tells whether a tensor is still an unchanged byte
    range of this file, which lets writers copy it file to file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd = open_weights(self.path)
        try:
            self.header, self.data_start = read_header(self.fd, str(self.path))
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        except BaseException:
            os.close(self.fd)
            raise
        self.base = self._bytes.untyped_storage().data_ptr()

    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header)

    def tensor(self, name: str) -> torch.Tensor:
        """``name`` as a view of the mapping (a copy only if the file misaligns it)."""
        entry = self.header[name]
        dtype = entry.torch_dtype
        begin, end = self.data_start + entry.begin, self.data_start + entry.end
        if begin == end:
            return torch.empty(entry.shape, dtype=dtype)
        raw = self._bytes[begin:end]
        if begin % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).reshape(entry.shape)

    def locate(self, t: torch.Tensor) -> int | None:
        """File offset of ``t``'s bytes when ``t`` is a contiguous view of this file, else None."""
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != self.base:
            return None
        return t.data_ptr() - self.base

    def release(self, name: str) -> None:
        """Drop the resident pages of tensor ``name`` (its views read the file again if used)."""
        begin, end = self.data_start + self.header[name].begin, self.data_start + self.header[name].end
        first = begin // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        """Close the file descriptor; tensors keep the mapping alive on their own."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SafetensorsWriter:
    """A safetensors file laid out up front from every tensor's dtype and shape, filled as tensors arrive.

    Tensors are stored in (element size descending, name) order so every one is aligned to its
    element size; the same layout always gives the same bytes, whatever order tensors come in.
    Copies run on a few threads; at most ``2 x threads`` wait at a time, which bounds the memory
    that pending tensors hold. ``label`` starts every error message ("rank 1").
    """

    def __init__(
        self,
        path: Path,
        layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        label: str,
        threads: int | None = None,
    ) -> None:
        self.path, self.label = Path(path), label
        self.layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        header: dict[str, Any] = {}
        offset = 0
        for name in sorted(layout, key=lambda n: (-layout[n][0].itemsize, n)):
            dtype, shape = layout[name][0], tuple(layout[name][1])
            nbytes = math.prod(shape) * dtype.itemsize
            self.layout[name] = (offset, nbytes, dtype, shape)
            header[name] = {
                "dtype": safetensors_code(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.pending = set(self.layout)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        threads = threads or io_threads()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=f"{self.path.stem}-io")
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._futures: list[concurrent.futures.Future] = []
        _pwrite_all(self.fd, memoryview(len(blob).to_bytes(8, "little") + blob), 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, name: str, t: torch.Tensor, sources: ByteSource | None = None) -> None:
        """Store tensor ``name``; file-to-file when ``sources`` locates ``t`` as an unchanged byte range."""
        offset, nbytes, dtype, shape = self.layout[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ModelcError(f"{self.label}: {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        where = sources.locate(t) if sources is not None else None
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._store, t, where, self.data_start + offset, nbytes))
        self.pending.discard(name)

    def _store(self, t: torch.Tensor, where: tuple[int, int] | None, offset: int, nbytes: int) -> None:
        try:
            if where is None or not _copy_range(where[0], where[1], self.fd, offset, nbytes):
                flat = t.detach().cpu().contiguous().reshape(-1)
                if nbytes:
                    _pwrite_all(self.fd, memoryview(flat.view(torch.uint8).numpy()), offset)
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait until every tensor given so far is in the file (before its source closes)."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def _finish(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self.fd)

    def close(self) -> None:
        """Wait for every copy; raise when one failed or a tensor was never written."""
        try:
            self.flush()
        finally:
            self._finish()
        if self.pending:
            raise ModelcError(f"{self.label}: tensor {sorted(self.pending)[0]} was never written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._finish()
