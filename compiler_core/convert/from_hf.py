"""Hugging Face checkpoint -> modelc checkpoint: config normalisation, weight mapping, sharding.

How the bytes move (``convert``):

* Source safetensors shards are memory-mapped (:class:`SourceFile`); a tensor is a view of the
  file's pages, so reading costs nothing until a byte is used.
* Each HF tensor goes through the ``map_weight`` hook (names, fused-QKV layout), a cast to the
  checkpoint dtype (a no-op when the dtype already matches) and the ``shard_param`` hook.
* Each rank's file is laid out up front from its graph (every parameter's shape and dtype is
  known before any weight is read) and tensors are written into it as they arrive
  (:class:`RankFileWriter`). A rank tensor that is still a contiguous, unchanged range of a
  source file (most weights at tp1, column-parallel slices at tp>1) is copied file to file with
  ``copy_file_range``, so its bytes never enter this process, as with ``cp``.

``--load_by_shard`` reads one source shard at a time per rank and drops it before the next, so
peak memory is about one shard plus the tensors being transformed; without it the source is
mapped once and every rank is cut from it. ``--workers N`` converts ranks in N processes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import mmap
import multiprocessing
import os
import pickle
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler_core.backends.torch.kernels import torch_dtype
from compiler_core.errors import ConfigError, ModelcError, UsageError, WeightFileError
from compiler_core.formats.checkpoint import TOKENIZER_DIR, make_config, rank_file, save_rank_weights, write_config
from compiler_core.formats.fileio import atomic_output_dir, read_json
from compiler_core.formats.hf_index import weight_files
from compiler_core.formats.safetensors_header import SAFETENSORS_DTYPES, open_weights, read_header
from compiler_core.ir import Graph
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.plugins import get_plugin_manager
from compiler_core.progress import progress
from compiler_core.registry import get_registry

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: Linux moves at most this many bytes per read/write/copy_file_range call.
_IO_CHUNK = 1 << 30


def copy_tokenizer(model_dir: Path | None, checkpoint_dir: Path) -> None:
    """Keep the source tokenizer beside the weights so engines can decode text on their own."""
    if model_dir is None:
        return
    files = [Path(model_dir) / name for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()]
    if files:
        (checkpoint_dir / TOKENIZER_DIR).mkdir()
        for f in files:
            shutil.copy2(f, checkpoint_dir / TOKENIZER_DIR / f.name)


@dataclass
class LoadedModel:
    """A model in IR terms: checkpoint config plus full (unsharded) parameters by IR name."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    source_dir: Path | None = None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of ``model_dir`` as a dict."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: model directory not found")
    return read_json(model_dir / "config.json", "Hugging Face config")


def resolve_dtype(dtype: str, hf: dict[str, Any], source: str) -> str:
    """``auto`` -> the HF config's ``torch_dtype`` (``dtype`` in transformers 5), else float32."""
    if dtype != "auto":
        return dtype
    declared = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if declared not in DTYPE_CHOICES[1:]:
        raise UsageError(f"{source}: torch_dtype {declared!r} is not one of float32, float16, bfloat16")
    return declared


def model_config_from_hf(model_dir: Path, dtype: str, mapping: Mapping) -> dict[str, Any]:
    """The checkpoint config for ``model_dir`` converted to ``dtype`` under ``mapping``."""
    source = str(Path(model_dir) / "config.json")
    hf = read_hf_config(model_dir)
    arch = get_registry().architecture_for_hf(hf, source)
    try:
        fields = arch.config_from_hf(hf)
        arch.check_mapping(fields, mapping)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return make_config(fields, resolve_dtype(dtype, hf, source), mapping)


# --- reading --------------------------------------------------------------------------------


class SourceFile:
    """One safetensors file, memory-mapped copy-on-write: tensors are views of its pages.

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

    def close(self) -> None:
        """Close the file descriptor; tensors keep the mapping alive on their own."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _refusal(exc: Exception) -> str:
    """The informative line of torch's weights_only refusal."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    picked = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (picked or lines or [type(exc).__name__])[0]


def read_bin_file(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, unpickled with ``weights_only=True`` only."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"{path}: refused: holds more than tensors ({_refusal(exc)}); .bin checkpoints are read with "
            "torch.load(weights_only=True) only"
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise UsageError(f"{path}: not a readable PyTorch weights file ({_refusal(exc)})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


class SourceSet:
    """Open source files: resolves which file (and offset) a tensor's bytes come from."""

    def __init__(self) -> None:
        self.files: dict[int, SourceFile] = {}

    def open(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors of one weight file, in file order."""
        if path.suffix != ".safetensors":
            yield from read_bin_file(path).items()
            return
        f = SourceFile(path)
        self.files[f.base] = f
        for name in f.names():
            yield name, f.tensor(name)

    def locate(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(fd, offset) of ``t``'s bytes in an open source file, or None."""
        f = self.files.get(t.untyped_storage().data_ptr()) if t.device.type == "cpu" else None
        offset = None if f is None else f.locate(t)
        return None if offset is None else (f.fd, offset)

    def close(self) -> None:
        """Close every file (copies that read from them must be flushed first)."""
        for f in self.files.values():
            f.close()
        self.files.clear()


def read_source_file(path: Path, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file (views of a copy-on-write mapping for safetensors);
    ``want(name)`` filters by name before a tensor is touched."""
    sources = SourceSet()
    try:
        for name, tensor in sources.open(Path(path)):
            if want is None or want(name):
                yield name, tensor
    finally:
        sources.close()


def map_tensors(
    config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Apply the ``map_weight`` hook and cast float tensors to the checkpoint dtype; each result is
    checked against the shape and dtype that the config implies, so weights that disagree with
    config.json are refused naming the file and tensor."""
    hook = get_plugin_manager().hook.map_weight
    dtype = torch_dtype(config["dtype"])
    expected = rank_graph({**config, "mapping": Mapping().to_json()}, 0).params
    for name, tensor in tensors:
        try:
            mapped = hook(config=config, name=name, tensor=tensor)
        except (RuntimeError, ValueError, IndexError) as exc:  # a layout op on a tensor of the wrong shape
            raise WeightFileError(
                f"{source}: tensor {name!r} {list(tensor.shape)} does not fit the model config.json describes ({exc})"
            ) from None
        if mapped is None:
            raise UsageError(f"{source}: tensor {name!r} is not mapped by any plugin")
        for ir_name, t in mapped.items():
            t = t.to(dtype) if t.is_floating_point() else t
            want = expected.get(ir_name)
            if want is None:
                raise WeightFileError(
                    f"{source}: tensor {name!r} maps to {ir_name}, which the model that config.json describes "
                    "does not have (check num_hidden_layers and the other sizes)"
                )
            if tuple(t.shape) != want.shape or t.dtype != torch_dtype(want.dtype):
                got = str(t.dtype).removeprefix("torch.")
                raise WeightFileError(
                    f"{source}: tensor {name!r} gives {ir_name} as {got} {list(t.shape)}, but config.json "
                    f"implies {want.dtype} {list(want.shape)}"
                )
            yield ir_name, t


def check_source_weights(model_dir: Path, config: dict[str, Any], files: list[Path]) -> None:
    """Check safetensors shards against ``config`` from their headers alone, before any weight is read:
    every tensor maps (through the ``map_weight`` hook, on meta tensors) to the shape and dtype the
    config implies, and every parameter the model needs is there. ``.bin`` shards are checked as
    they load, since their shapes are known only then."""
    if any(path.suffix != ".safetensors" for path in files):
        return
    found: set[str] = set()
    for path in files:
        fd = open_weights(path)
        try:
            header, _ = read_header(fd, str(path))
        finally:
            os.close(fd)
        metas = ((n, torch.empty(e.shape, dtype=e.torch_dtype, device="meta")) for n, e in header.items())
        found.update(name for name, _ in map_tensors(config, metas, str(path)))
    needed = rank_graph({**config, "mapping": Mapping().to_json()}, 0).params
    missing = sorted(set(needed) - found)
    if missing:
        raise WeightFileError(f"{model_dir}: parameter {missing[0]} is not in the source checkpoint")


def load_full_model(model_dir: Path, dtype: str, show_progress: bool = True) -> LoadedModel:
    """Read every source tensor once and map it to IR names (tp=1, pp=1)."""
    config = model_config_from_hf(model_dir, dtype, Mapping())
    check_source_weights(model_dir, config, weight_files(model_dir))
    weights: dict[str, torch.Tensor] = {}
    for path in progress(weight_files(model_dir), desc="load", unit="shard", enable=show_progress):
        weights.update(map_tensors(config, read_source_file(path), str(path)))
    return LoadedModel(config, weights, Path(model_dir))


# --- sharding -------------------------------------------------------------------------------


def shard_for_rank(
    graph: Graph, config: dict[str, Any], mapping: Mapping, rank: int, name: str, tensor: torch.Tensor
) -> torch.Tensor:
    """Rank ``rank``'s part of full parameter ``name`` (the ``shard_param`` hook), checked
    against the shape and dtype that the rank's graph declares."""
    hook = get_plugin_manager().hook.shard_param
    try:
        out = hook(name=name, tensor=tensor, graph=graph, config=config, mapping=mapping, rank=rank)
    except ValueError as exc:
        raise ModelcError(f"rank {rank}: {exc}") from None
    want = graph.params[name]
    if tuple(out.shape) != want.shape:
        raise ModelcError(f"rank {rank}: parameter {name} sharded to {list(out.shape)}, graph wants {list(want.shape)}")
    if out.dtype != torch_dtype(want.dtype):
        raise ModelcError(f"rank {rank}: parameter {name} has dtype {out.dtype}, graph wants {want.dtype}")
    return out


def rank_weights(model: LoadedModel, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s parameters from a fully loaded model."""
    config = model.config
    mapping = Mapping.from_json(config["mapping"])
    graph = rank_graph(config, rank)
    out = {}
    for name in graph.params:
        if name not in model.weights:
            raise WeightFileError(f"{model.source_dir}: parameter {name} is not in the source checkpoint")
        out[name] = shard_for_rank(graph, config, mapping, rank, name, model.weights[name])
    return out


# --- writing --------------------------------------------------------------------------------


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


class RankFileWriter:
    """A rank's safetensors file, laid out from its graph and filled as tensors arrive.

    Tensors are stored in (element size descending, name) order so every one is aligned to its
    element size; the same graph always gives the same bytes, whatever order tensors come in.
    Copies run on a few threads; at most ``2 x threads`` wait at a time, which bounds the memory
    that pending tensors hold.
    """

    def __init__(
        self, path: Path, graph: Graph, rank: int, threads: int | None = None, source: str = "the source model"
    ) -> None:
        self.path, self.rank, self.source = Path(path), rank, source
        self.layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        header: dict[str, Any] = {}
        offset = 0
        params = graph.params
        for name in sorted(params, key=lambda n: (-torch_dtype(params[n].dtype).itemsize, n)):
            dtype, shape = torch_dtype(params[name].dtype), tuple(params[name].shape)
            nbytes = math.prod(shape) * dtype.itemsize
            self.layout[name] = (offset, nbytes, dtype, shape)
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[dtype],
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
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=f"rank{rank}-io")
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._futures: list[concurrent.futures.Future] = []
        _pwrite_all(self.fd, memoryview(len(blob).to_bytes(8, "little") + blob), 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, name: str, t: torch.Tensor, sources: SourceSet | None = None) -> None:
        """Store parameter ``name``; file-to-file when ``t`` is an unchanged range of a source."""
        offset, nbytes, dtype, shape = self.layout[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ModelcError(f"rank {self.rank}: {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
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
        """Wait for every copy; raise when one failed or a parameter was never written."""
        try:
            self.flush()
        finally:
            self._finish()
        if self.pending:
            raise WeightFileError(f"{self.source}: parameter {sorted(self.pending)[0]} is not in the source checkpoint")

    def __enter__(self) -> RankFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._finish()


# --- conversion -----------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything one rank's conversion needs (picklable for worker processes)."""

    model_dir: Path
    config: dict[str, Any]
    rank: int
    out_dir: Path

    def setup(self) -> tuple[Graph, Mapping, RankFileWriter]:
        graph = rank_graph(self.config, self.rank)
        writer = RankFileWriter(rank_file(self.out_dir, self.rank), graph, self.rank, source=str(self.model_dir))
        return graph, Mapping.from_json(self.config["mapping"]), writer


def stream_rank(job: _Job) -> Iterator[str]:
    """Write ``job.rank``'s file reading one source shard at a time (``--load_by_shard``);
    yields each shard's name when it is done. Tensors outside the rank's pipeline stage are
    skipped before they are touched."""
    graph, mapping, writer = job.setup()
    arch = get_registry().architecture(job.config["architecture"], "config.json")
    layers = range(*graph.attrs["layers"]) if "layers" in graph.attrs else None

    def wanted(name: str) -> bool:
        layer = arch.source_layer(name)
        return layer is None or layers is None or layer in layers

    with writer:
        for path in weight_files(job.model_dir):
            sources = SourceSet()
            try:
                tensors = ((n, t) for n, t in sources.open(path) if wanted(n))
                for name, tensor in map_tensors(job.config, tensors, str(path)):
                    if name in graph.params:
                        writer.write(name, shard_for_rank(graph, job.config, mapping, job.rank, name, tensor), sources)
                writer.flush()  # its copies read from this shard's file descriptors
            finally:
                sources.close()  # the shard's pages go before the next shard is read
            yield path.name


def write_rank_from(job: _Job, weights: dict[str, torch.Tensor], sources: SourceSet) -> Iterator[str]:
    """Write ``job.rank``'s file from a fully mapped model; yields each parameter written."""
    graph, mapping, writer = job.setup()
    with writer:
        for name in graph.params:
            if name not in weights:
                raise WeightFileError(f"{job.model_dir}: parameter {name} is not in the source checkpoint")
            writer.write(name, shard_for_rank(graph, job.config, mapping, job.rank, name, weights[name]), sources)
            yield name


def _load_mapped(model_dir: Path, config: dict[str, Any], sources: SourceSet) -> Iterator[dict[str, torch.Tensor]]:
    """Map every source file (one dict of IR tensors per file), keeping the files open."""
    for path in weight_files(model_dir):
        yield dict(map_tensors(config, sources.open(path), str(path)))


def _convert_rank_worker(job: _Job, by_shard: bool) -> int:
    if by_shard:
        for _ in stream_rank(job):
            pass
        return job.rank
    sources = SourceSet()
    try:
        weights: dict[str, torch.Tensor] = {}
        for part in _load_mapped(job.model_dir, job.config, sources):
            weights.update(part)
        for _ in write_rank_from(job, weights, sources):
            pass
    finally:
        sources.close()
    return job.rank


def write_model(model: LoadedModel, output_dir: Path, mapping: Mapping, show_progress: bool = True) -> None:
    """Shard a loaded (possibly quantized) model under ``mapping`` and write it atomically."""
    model.config = {**model.config, "mapping": mapping.to_json()}
    with atomic_output_dir(output_dir) as tmp:
        for rank in progress(mapping.ranks(), desc="write", unit="rank", enable=show_progress):
            save_rank_weights(rank_file(tmp, rank), rank_weights(model, rank))
        write_config(tmp, model.config)
        copy_tokenizer(model.source_dir, tmp)


def convert(
    model_dir: Path,
    output_dir: Path,
    *,
    dtype: str = "auto",
    mapping: Mapping | None = None,
    load_by_shard: bool = False,
    workers: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint into a modelc checkpoint directory; return its config.

    Every check that needs no weights (config fields, the tp/pp split, each rank's graph, the
    source files) runs before anything is read or written.
    """
    model_dir, mapping = Path(model_dir), mapping or Mapping()
    config = model_config_from_hf(model_dir, dtype, mapping)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    graphs = [rank_graph(config, rank) for rank in mapping.ranks()]
    files = weight_files(model_dir)
    check_source_weights(model_dir, config, files)
    with atomic_output_dir(output_dir) as tmp:
        jobs = [_Job(model_dir, config, rank, tmp) for rank in mapping.ranks()]
        if workers > 1 and mapping.world_size > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding mapped weights
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = [pool.submit(_convert_rank_worker, job, load_by_shard) for job in jobs]
                done = concurrent.futures.as_completed(futures)
                for future in progress(done, total=len(futures), desc="convert", unit="rank", enable=show_progress):
                    future.result()
        elif load_by_shard:
            steps = (shard for job in jobs for shard in stream_rank(job))
            for _ in progress(steps, total=len(jobs) * len(files), desc="convert", unit="shard", enable=show_progress):
                pass
        else:
            with contextlib.closing(SourceSet()) as sources:
                weights: dict[str, torch.Tensor] = {}
                for part in progress(
                    _load_mapped(model_dir, config, sources),
                    total=len(files),
                    desc="load",
                    unit="shard",
                    enable=show_progress,
                ):
                    weights.update(part)
                total = sum(len(g.params) for g in graphs)
                steps = (name for job in jobs for name in write_rank_from(job, weights, sources))
                for _ in progress(steps, total=total, desc="convert", unit="tensor", enable=show_progress):
                    pass
        write_config(tmp, config)
        copy_tokenizer(model_dir, tmp)
    return config
