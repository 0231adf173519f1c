"""Hugging Face checkpoint -> modelc checkpoint: config normalisation, weight mapping, sharding.

How the bytes move (``convert``):

* Source safetensors shards are memory-mapped (``formats.safetensors_io.SafetensorsReader``, the
  reader rank files are loaded with too); a tensor is a view of the file's pages, so reading costs
  nothing until a byte is used.
* Each HF tensor goes through the architecture's ``map_weight`` (names, fused-QKV layout), a cast
  to the checkpoint dtype (a no-op when the dtype already matches) and its ``shard_param``.
* Each rank's file is laid out up front from its graph (every parameter's shape and dtype is
  known before any weight is read) and tensors are written into it as they arrive
  (:func:`rank_file_writer`). A rank tensor that is still a contiguous, unchanged range of a
  source file (most weights at tp1, column-parallel slices at tp>1) is copied file to file with
  ``copy_file_range``, so its bytes never enter this process, as with ``cp``.

``--load_by_shard`` reads one source shard at a time per rank and drops it before the next, so
peak memory is about one shard plus the tensors being transformed; without it the source is
mapped once and every rank is cut from it. ``--workers N`` converts ranks in N processes.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from compiler_core.api import Architecture
from compiler_core.dtypes import MODEL_DTYPES, torch_dtype
from compiler_core.errors import ConfigError, ModelcError, UsageError, WeightFileError
from compiler_core.formats.checkpoint import (
    CHECKPOINT_OUTPUT,
    TOKENIZER_DIR,
    rank_file,
    save_rank_weights,
    write_config,
)
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.formats.fileio import atomic_output_dir, read_json
from compiler_core.formats.hf_index import weight_files
from compiler_core.formats.safetensors_header import tensors_of
from compiler_core.formats.safetensors_io import SafetensorsReader, SafetensorsWriter
from compiler_core.host import load_registry
from compiler_core.ir import Graph
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.progress import progress
from compiler_core.registry import Registry
from compiler_core.workers import map_in_processes

DTYPE_CHOICES = ("auto", *MODEL_DTYPES)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


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
    """A model in IR terms: checkpoint config plus full (unsharded) parameters by IR name.

    ``config`` is frozen; a quantization scheme replaces it with an updated copy."""

    config: CheckpointConfig
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
    if declared not in MODEL_DTYPES:
        raise UsageError(f"{source}: torch_dtype {declared!r} is not one of {', '.join(MODEL_DTYPES)}")
    return declared


def model_config_from_hf(registry: Registry, model_dir: Path, dtype: str, mapping: Mapping) -> CheckpointConfig:
    """The checkpoint config for ``model_dir`` converted to ``dtype`` under ``mapping``."""
    source = str(Path(model_dir) / "config.json")
    hf = read_hf_config(model_dir)
    arch = registry.architecture_for_hf(hf, source)
    try:
        fields = arch.config_from_hf(hf)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config = CheckpointConfig.from_model_fields(fields, resolve_dtype(dtype, hf, source), mapping, source)
    try:
        arch.check_mapping(config.model, mapping)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


# --- reading --------------------------------------------------------------------------------


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
        self.files: dict[int, SafetensorsReader] = {}

    def open(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors of one weight file, in file order."""
        if path.suffix != ".safetensors":
            yield from read_bin_file(path).items()
            return
        f = SafetensorsReader(path)
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
    arch: Architecture,
    config: CheckpointConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    used: Collection[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map each tensor with ``arch.map_weight`` and cast float tensors to the checkpoint dtype.

    ``used`` holds the parameter names of every rank's graph: a tensor mapped to a name outside
    it is an error, since dropping it would convert a model that lacks a weight its source has
    (``map_weight`` returns ``{}`` to drop a tensor on purpose).
    """
    dtype = torch_dtype(config.dtype)
    for name, tensor in tensors:
        try:
            mapped = arch.map_weight(config.model, name, tensor)
        except (RuntimeError, ValueError, IndexError) as exc:  # a layout op on a tensor of the wrong shape
            raise WeightFileError(
                f"{source}: tensor {name!r} {list(tensor.shape)} does not fit the model config.json describes ({exc})"
            ) from None
        if mapped is None:
            raise UsageError(f"{source}: tensor {name!r} is not mapped by architecture {arch.name!r}")
        unused = [] if used is None else sorted(n for n in mapped if n not in used)
        if unused:
            raise UsageError(
                f"{source}: tensor {name!r} maps to {', '.join(unused)}, which no graph parameter of architecture "
                f"{arch.name!r} uses (map_weight returns {{}} to drop a tensor on purpose)"
            )
        for ir_name, t in mapped.items():
            yield ir_name, t.to(dtype) if t.is_floating_point() else t


def graph_params(registry: Registry, config: CheckpointConfig) -> frozenset[str]:
    """The parameter names of every rank's graph under ``config``'s mapping."""
    return frozenset(name for rank in config.mapping.ranks() for name in rank_graph(registry, config, rank).params)


def check_source_weights(
    registry: Registry, arch: Architecture, model_dir: Path, config: CheckpointConfig, files: list[Path]
) -> None:
    """Check safetensors shards against ``config`` from their headers alone, before any weight is read:
    every tensor maps (``arch.map_weight`` on meta tensors) to the shape and dtype that the config
    implies, and every parameter the model needs is there. ``.bin`` shards are checked as they load,
    since their shapes are known only then."""
    if any(path.suffix != ".safetensors" for path in files):
        return
    expected = rank_graph(registry, replace(config, mapping=Mapping()), 0).params
    found: set[str] = set()
    for path in files:
        for name, entry in tensors_of(path).items():
            meta = torch.empty(entry.shape, dtype=entry.torch_dtype, device="meta")
            for ir_name, t in map_tensors(arch, config, [(name, meta)], str(path), frozenset(expected)):
                want = expected[ir_name]
                if tuple(t.shape) != want.shape or t.dtype != torch_dtype(want.dtype):
                    got = str(t.dtype).removeprefix("torch.")
                    raise WeightFileError(
                        f"{path}: tensor {name!r} gives {ir_name} as {got} {list(t.shape)}, but config.json "
                        f"implies {want.dtype} {list(want.shape)}"
                    )
                found.add(ir_name)
    missing = sorted(set(expected) - found)
    if missing:
        raise WeightFileError(f"{model_dir}: parameter {missing[0]} is not in the source checkpoint")


def load_full_model(registry: Registry, model_dir: Path, dtype: str, show_progress: bool = True) -> LoadedModel:
    """Read every source tensor once and map it to IR names (tp=1, pp=1)."""
    config = model_config_from_hf(registry, model_dir, dtype, Mapping())
    arch = registry.architecture(config.architecture, "config.json")
    check_source_weights(registry, arch, model_dir, config, weight_files(model_dir))
    used = graph_params(registry, config)
    weights: dict[str, torch.Tensor] = {}
    for path in progress(weight_files(model_dir), desc="load", unit="shard", enable=show_progress):
        weights.update(map_tensors(arch, config, read_source_file(path), str(path), used))
    return LoadedModel(config, weights, Path(model_dir))


# --- sharding -------------------------------------------------------------------------------


def shard_for_rank(
    arch: Architecture,
    graph: Graph,
    config: CheckpointConfig,
    rank: int,
    name: str,
    tensor: torch.Tensor,
) -> torch.Tensor:
    """Rank ``rank``'s part of full parameter ``name`` (``arch.shard_param``, under ``config.mapping``),
    checked against the shape and dtype that the rank's graph declares."""
    try:
        out = arch.shard_param(name, tensor, graph, config.model, config.mapping, rank)
    except ValueError as exc:
        raise ModelcError(f"rank {rank}: {exc}") from None
    want = graph.params[name]
    if tuple(out.shape) != want.shape:
        raise ModelcError(f"rank {rank}: parameter {name} sharded to {list(out.shape)}, graph wants {list(want.shape)}")
    if out.dtype != torch_dtype(want.dtype):
        raise ModelcError(f"rank {rank}: parameter {name} has dtype {out.dtype}, graph wants {want.dtype}")
    return out


def rank_weights(registry: Registry, model: LoadedModel, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s parameters from a fully loaded model."""
    config = model.config
    arch = registry.architecture(config.architecture, "config.json")
    graph = rank_graph(registry, config, rank)
    out = {}
    for name in graph.params:
        if name not in model.weights:
            raise WeightFileError(f"{model.source_dir}: parameter {name} is not in the source checkpoint")
        out[name] = shard_for_rank(arch, graph, config, rank, name, model.weights[name])
    return out


# --- writing --------------------------------------------------------------------------------


def rank_file_writer(path: Path, graph: Graph, rank: int) -> SafetensorsWriter:
    """The writer of rank ``rank``'s file, laid out from every parameter its graph declares."""
    layout = {name: (torch_dtype(p.dtype), p.shape) for name, p in graph.params.items()}
    return SafetensorsWriter(path, layout, f"rank {rank}")


# --- conversion -----------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything one rank's conversion needs besides the registry (picklable for worker processes)."""

    model_dir: Path
    config: CheckpointConfig
    rank: int
    out_dir: Path
    #: Parameter names of every rank's graph (a mapped tensor outside them is an error).
    used: frozenset[str]

    def setup(self, registry: Registry) -> tuple[Architecture, Graph, SafetensorsWriter]:
        arch = registry.architecture(self.config.architecture, "config.json")
        graph = rank_graph(registry, self.config, self.rank)
        writer = rank_file_writer(rank_file(self.out_dir, self.rank), graph, self.rank)
        return arch, graph, writer


def stream_rank(registry: Registry, job: _Job) -> Iterator[str]:
    """Write ``job.rank``'s file reading one source shard at a time (``--load_by_shard``);
    yields each shard's name when it is done. Tensors outside the rank's pipeline stage are
    skipped before they are touched."""
    arch, graph, writer = job.setup(registry)
    layers = range(*graph.attrs["layers"])

    def wanted(name: str) -> bool:
        layer = arch.source_layer(name)
        return layer is None or layer in layers

    with writer:
        for path in weight_files(job.model_dir):
            sources = SourceSet()
            try:
                tensors = ((n, t) for n, t in sources.open(path) if wanted(n))
                for name, tensor in map_tensors(arch, job.config, tensors, str(path), job.used):
                    if name in graph.params:
                        shard = shard_for_rank(arch, graph, job.config, job.rank, name, tensor)
                        writer.write(name, shard, sources)
                writer.flush()  # its copies read from this shard's file descriptors
            finally:
                sources.close()  # the shard's pages go before the next shard is read
            yield path.name
        if writer.pending:
            raise WeightFileError(
                f"{job.model_dir}: parameter {sorted(writer.pending)[0]} is not in the source checkpoint"
            )


def write_rank_from(
    registry: Registry, job: _Job, weights: dict[str, torch.Tensor], sources: SourceSet
) -> Iterator[str]:
    """Write ``job.rank``'s file from a fully mapped model; yields each parameter written."""
    arch, graph, writer = job.setup(registry)
    with writer:
        for name in graph.params:
            if name not in weights:
                raise WeightFileError(f"{job.model_dir}: parameter {name} is not in the source checkpoint")
            shard = shard_for_rank(arch, graph, job.config, job.rank, name, weights[name])
            writer.write(name, shard, sources)
            yield name


def _load_mapped(
    arch: Architecture, model_dir: Path, config: CheckpointConfig, sources: SourceSet, used: frozenset[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Map every source file (one dict of IR tensors per file), keeping the files open."""
    for path in weight_files(model_dir):
        yield dict(map_tensors(arch, config, sources.open(path), str(path), used))


def _convert_rank_worker(job: _Job, by_shard: bool) -> int:
    """One rank in a spawned worker process, which loads the installed plugins for itself."""
    registry = load_registry()
    if by_shard:
        for _ in stream_rank(registry, job):
            pass
        return job.rank
    arch = registry.architecture(job.config.architecture, "config.json")
    sources = SourceSet()
    try:
        weights: dict[str, torch.Tensor] = {}
        for part in _load_mapped(arch, job.model_dir, job.config, sources, job.used):
            weights.update(part)
        for _ in write_rank_from(registry, job, weights, sources):
            pass
    finally:
        sources.close()
    return job.rank


def write_model(
    registry: Registry, model: LoadedModel, directory: Path, mapping: Mapping, show_progress: bool = True
) -> None:
    """Shard a loaded (possibly quantized) model under ``mapping`` and write it into ``directory``
    (the temporary directory of an :func:`atomic_output_dir`)."""
    model.config = replace(model.config, mapping=mapping)
    for rank in progress(mapping.ranks(), desc="write", unit="rank", enable=show_progress):
        save_rank_weights(rank_file(directory, rank), rank_weights(registry, model, rank))
    write_config(directory, model.config)
    copy_tokenizer(model.source_dir, directory)


def convert(
    model_dir: Path,
    output_dir: Path,
    *,
    dtype: str = "auto",
    mapping: Mapping | None = None,
    load_by_shard: bool = False,
    workers: int = 1,
    show_progress: bool = True,
    registry: Registry | None = None,
) -> CheckpointConfig:
    """Convert a Hugging Face checkpoint into a modelc checkpoint directory; return its config.

    Every check that needs no weights (config fields, the tp/pp split, each rank's graph, the
    source files) runs before anything is read or written. ``registry`` holds the plugins to use
    (default: the installed ones, loaded for this call); worker processes load the installed ones.
    """
    registry = registry or load_registry()
    model_dir, mapping = Path(model_dir), mapping or Mapping()
    config = model_config_from_hf(registry, model_dir, dtype, mapping)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    arch = registry.architecture(config.architecture, "config.json")
    graphs = [rank_graph(registry, config, rank) for rank in mapping.ranks()]
    files = weight_files(model_dir)
    check_source_weights(registry, arch, model_dir, config, files)
    with atomic_output_dir(output_dir, CHECKPOINT_OUTPUT, inputs=[model_dir]) as tmp:
        used = frozenset(name for graph in graphs for name in graph.params)
        jobs = [_Job(model_dir, config, rank, tmp, used) for rank in mapping.ranks()]
        if workers > 1 and mapping.world_size > 1:
            jobs_args = [(job, load_by_shard) for job in jobs]
            map_in_processes(
                _convert_rank_worker, jobs_args, workers, desc="convert", unit="rank", show_progress=show_progress
            )
        elif load_by_shard:
            steps = (shard for job in jobs for shard in stream_rank(registry, job))
            for _ in progress(steps, total=len(jobs) * len(files), desc="convert", unit="shard", enable=show_progress):
                pass
        else:
            with contextlib.closing(SourceSet()) as sources:
                weights: dict[str, torch.Tensor] = {}
                for part in progress(
                    _load_mapped(arch, model_dir, config, sources, used),
                    total=len(files),
                    desc="load",
                    unit="shard",
                    enable=show_progress,
                ):
                    weights.update(part)
                total = sum(len(g.params) for g in graphs)
                steps = (name for job in jobs for name in write_rank_from(registry, job, weights, sources))
                for _ in progress(steps, total=total, desc="convert", unit="tensor", enable=show_progress):
                    pass
        write_config(tmp, config)
        copy_tokenizer(model_dir, tmp)
    return config
