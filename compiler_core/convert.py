"""Hugging Face checkpoint -> modelc checkpoint: config normalisation, weight mapping, sharding."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler_core.checkpoint import TOKENIZER_DIR, make_config, rank_file, save_rank_weights, write_config
from compiler_core.errors import ModelcError, UsageError
from compiler_core.fileio import atomic_output_dir, read_json
from compiler_core.ir import Graph
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.plugins import get_plugin_manager
from compiler_core.progress import progress
from compiler_core.registry import get_registry
from compiler_core.runtime.kernels import torch_dtype

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
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
    """A model in IR terms: checkpoint config plus full (unsharded) parameters by IR name."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    source_dir: Path | None = None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: model directory not found")
    return read_json(model_dir / "config.json", "Hugging Face config")


def resolve_dtype(dtype: str, hf: dict[str, Any], source: str) -> str:
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
        raise UsageError(f"{source}: {exc}") from None
    return make_config(fields, resolve_dtype(dtype, hf, source), mapping)


def source_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors shards, else PyTorch .bin shards."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors or *.bin weight files")
    return files


def read_source_file(path: Path, want: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file; ``want(name)`` filters before reading (safetensors only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if want is None or want(name):
                    yield name, f.get_tensor(name)
        return
    try:
        # Never unpickle arbitrary objects from a checkpoint: tensors only.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{path}: cannot be read as a weights-only PyTorch file ({exc})") from None
    for name, tensor in state.items():
        if want is None or want(name):
            yield name, tensor


def map_tensors(
    config: dict[str, Any], tensors: Iterator[tuple[str, torch.Tensor]], source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Apply the ``map_weight`` hook and cast float tensors to the checkpoint dtype."""
    hook = get_plugin_manager().hook.map_weight
    dtype = torch_dtype(config["dtype"])
    for name, tensor in tensors:
        mapped = hook(config=config, name=name, tensor=tensor)
        if mapped is None:
            raise UsageError(f"{source}: tensor {name!r} is not mapped by any plugin")
        for ir_name, t in mapped.items():
            yield ir_name, t.to(dtype) if t.is_floating_point() else t


def load_full_model(model_dir: Path, dtype: str, show_progress: bool = True) -> LoadedModel:
    """Read every source tensor once and map it to IR names (tp=1, pp=1)."""
    config = model_config_from_hf(model_dir, dtype, Mapping())
    weights: dict[str, torch.Tensor] = {}
    for path in progress(source_files(model_dir), desc="load", unit="shard", enable=show_progress):
        weights.update(map_tensors(config, read_source_file(path), str(path)))
    return LoadedModel(config, weights, Path(model_dir))


def shard_for_rank(
    graph: Graph, config: dict[str, Any], mapping: Mapping, rank: int, name: str, tensor
) -> torch.Tensor:
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
            raise ModelcError(f"parameter {name} is not in the source checkpoint")
        out[name] = shard_for_rank(graph, config, mapping, rank, name, model.weights[name])
    return out


def stream_rank_weights(model_dir: Path, config: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s parameters reading one source shard at a time (``--load_by_shard``)."""
    mapping = Mapping.from_json(config["mapping"])
    graph = rank_graph(config, rank)
    arch = get_registry().architecture(config["architecture"], "config.json")
    layers = range(*graph.attrs["layers"]) if "layers" in graph.attrs else None

    def wanted(name: str) -> bool:
        layer = arch.source_layer(name)
        return layer is None or layers is None or layer in layers

    out: dict[str, torch.Tensor] = {}
    for path in source_files(model_dir):
        for name, tensor in map_tensors(config, read_source_file(path, wanted), str(path)):
            if name in graph.params:
                out[name] = shard_for_rank(graph, config, mapping, rank, name, tensor)
        # Drop the shard before reading the next one.
    missing = sorted(set(graph.params) - set(out))
    if missing:
        raise ModelcError(f"rank {rank}: parameter {missing[0]} is not in the source checkpoint")
    return out


def _convert_rank_worker(model_dir: str, config: dict[str, Any], rank: int, tmp: str, by_shard: bool) -> int:
    if by_shard:
        weights = stream_rank_weights(Path(model_dir), config, rank)
    else:
        model = load_full_model(Path(model_dir), config["dtype"], show_progress=False)
        model.config = config
        weights = rank_weights(model, rank)
    save_rank_weights(rank_file(Path(tmp), rank), weights)
    return rank


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
    """Convert a Hugging Face checkpoint into a modelc checkpoint directory; return its config."""
    mapping = mapping or Mapping()
    config = model_config_from_hf(model_dir, dtype, mapping)
    for rank in mapping.ranks():
        rank_graph(config, rank)  # fail on a bad split before any weight is read
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    with atomic_output_dir(output_dir) as tmp:
        if workers > 1 and mapping.world_size > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, mapping.world_size), mp_context=ctx) as pool:
                futures = [
                    pool.submit(_convert_rank_worker, str(model_dir), config, r, str(tmp), load_by_shard)
                    for r in mapping.ranks()
                ]
                done = concurrent.futures.as_completed(futures)
                for future in progress(done, total=len(futures), desc="convert", unit="rank", enable=show_progress):
                    future.result()
        elif load_by_shard:
            for rank in progress(mapping.ranks(), desc="convert", unit="rank", enable=show_progress):
                save_rank_weights(rank_file(tmp, rank), stream_rank_weights(model_dir, config, rank))
        else:
            model = load_full_model(model_dir, config["dtype"], show_progress)
            model.config = config
            for rank in progress(mapping.ranks(), desc="convert", unit="rank", enable=show_progress):
                save_rank_weights(rank_file(tmp, rank), rank_weights(model, rank))
        write_config(tmp, config)
        copy_tokenizer(model_dir, tmp)
    return config
