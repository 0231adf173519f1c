"""The engine directory: ``config.json`` (build settings, backend, each rank's IR) + per-rank artefacts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compiler_core.errors import ConfigError, UsageError
from compiler_core.formats.checkpoint import (
    TOKENIZER_DIR,
    check_rank_file,
    load_rank_weights,
    rank_file,
    read_config,
)
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.formats.fields import int_field, is_int
from compiler_core.formats.fileio import OutputKind, atomic_output_dir, read_json, write_json
from compiler_core.ir import Graph, format_graph, validate
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.progress import progress
from compiler_core.api import Backend
from compiler_core.host import load_registry
from compiler_core.registry import Registry
from compiler_core.workers import map_in_processes

ENGINE_FORMAT = "modelc-engine"
ENGINE_FORMAT_VERSION = 1
#: What build writes; only an earlier engine (or an empty directory) is replaced.
ENGINE_OUTPUT = OutputKind("modelc engine", ENGINE_FORMAT)
DEFAULT_SETTINGS = {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048}


def choose_backend(requested: str | None, registry: Registry | None = None) -> tuple[Backend, str]:
    """The backend to build with and a one-line reason for the choice, among ``registry``'s
    (default: the installed plugins', loaded for this call)."""
    registry = registry or load_registry()
    if requested is not None:
        backend = registry.backend(requested, "--backend")
        reason = backend.unavailable_reason()
        if reason is not None:
            raise UsageError(f"--backend {requested}: {reason}")
        return backend, "requested with --backend"
    usable = [b for b in registry.backends.values() if b.unavailable_reason() is None and b.preference() >= 0]
    best = max(usable, key=lambda b: b.preference())
    others = ", ".join(
        sorted(
            f"{b.name} ({b.unavailable_reason() or b.preference_reason() or 'lower preference'})"
            for b in registry.backends.values()
            if b is not best
        )
    )
    why = f" ({best.preference_reason()})" if best.preference_reason() else ""
    return best, f"default: highest preference usable here{why}; others: {others or 'none'}"


def _build_rank(
    registry: Registry, backend: Backend, graph: Graph, checkpoint_dir: Path, out_dir: Path, rank: int, settings
):
    weights = load_rank_weights(rank_file(checkpoint_dir, rank))
    return backend.build_rank(graph, weights, out_dir, rank, settings, registry) or {}


def _build_rank_worker(
    backend_name: str, graph_json: dict[str, Any], checkpoint_dir: str, out_dir: str, rank: int, settings
) -> dict[str, Any]:
    """One rank in a spawned worker process, which loads the installed plugins for itself."""
    registry = load_registry()
    backend = registry.backend(backend_name, "--backend")
    graph = Graph.from_json(graph_json)
    return _build_rank(registry, backend, graph, Path(checkpoint_dir), Path(out_dir), rank, settings)


def build_settings(settings: dict[str, Any], model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults filled in and checked: max_batch_size, max_input_len, max_seq_len (all >= 1).

    ``max_seq_len`` defaults to the model's ``max_position_embeddings`` when its config has one
    (the longest sequence it was trained for), and ``max_input_len`` to at most that.
    """
    defaults = dict(DEFAULT_SETTINGS)
    trained = (model_config or {}).get("max_position_embeddings")
    if isinstance(trained, int) and not isinstance(trained, bool) and trained >= 1:
        defaults["max_seq_len"] = trained
        defaults["max_input_len"] = min(defaults["max_input_len"], trained)
    given = {k: v for k, v in settings.items() if v is not None}
    if "max_seq_len" in given and "max_input_len" not in given:
        defaults["max_input_len"] = min(defaults["max_input_len"], given["max_seq_len"])
    settings = {**defaults, **given}
    for key in DEFAULT_SETTINGS:
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise UsageError(f"--{key} must be a positive integer, got {settings[key]!r}")
    if settings["max_input_len"] > settings["max_seq_len"]:
        raise UsageError(f"--max_input_len {settings['max_input_len']} exceeds --max_seq_len {settings['max_seq_len']}")
    return settings


def build_engine(
    checkpoint_dir: Path,
    output_dir: Path,
    backend: Backend,
    settings: dict[str, Any],
    show_progress: bool = True,
    workers: int = 1,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Build every rank of a checkpoint with ``backend`` into ``output_dir`` (atomically).

    ``workers`` > 1 builds ranks in that many spawned processes (each loads only its own
    rank's weights); the result is the same engine as a sequential build. ``registry`` holds
    the plugins to use (default: the installed ones, loaded for this call).
    """
    registry = registry or load_registry()
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    mapping = config.mapping
    settings = build_settings(settings, config.model)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    graphs = [rank_graph(registry, config, r, str(checkpoint_dir / "config.json")) for r in mapping.ranks()]
    for rank, graph in enumerate(graphs):
        check_rank_file(rank_file(checkpoint_dir, rank), graph.params)
    desc = f"build ({backend.name})"
    with atomic_output_dir(output_dir, ENGINE_OUTPUT, inputs=[checkpoint_dir]) as tmp:
        if workers > 1 and mapping.world_size > 1:
            jobs = [
                (backend.name, graphs[r].to_json(), str(checkpoint_dir), str(tmp), r, settings) for r in mapping.ranks()
            ]
            facts = map_in_processes(
                _build_rank_worker, jobs, workers, desc=desc, unit="rank", show_progress=show_progress
            )
        else:
            facts = [
                _build_rank(registry, backend, graphs[rank], checkpoint_dir, tmp, rank, settings)
                for rank in progress(mapping.ranks(), desc=desc, unit="rank", enable=show_progress)
            ]
        tokenizer = checkpoint_dir / TOKENIZER_DIR
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
        engine_config = {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "backend": backend.name,
            "build": settings,
            "checkpoint": config.to_json(),
            "ranks": facts,
            "graphs": [g.to_json() for g in graphs],
        }
        write_json(tmp / "config.json", engine_config)
    return engine_config


def check_engine_config(config: dict[str, Any], source: str) -> Mapping:
    """Check an engine config's fields (format, version, backend, build limits, checkpoint, one graph
    per rank); return the engine's mapping. Each rank's graph is read and validated by :func:`engine_graph`."""
    if config.get("format") != ENGINE_FORMAT:
        raise ConfigError(f"{source}: not a modelc engine (field 'format' is {config.get('format')!r})")
    version = config.get("format_version")
    if not is_int(version) or version != ENGINE_FORMAT_VERSION:
        raise ConfigError(f"{source}: format_version {version!r} is not {ENGINE_FORMAT_VERSION}")
    for field in ("backend", "build", "checkpoint", "graphs"):
        if field not in config:
            raise ConfigError(f"{source}: field {field!r} is missing")
    if not isinstance(config["backend"], str):
        raise ConfigError(f"{source}: field 'backend' must be a string, got {config['backend']!r}")
    build = config["build"]
    if not isinstance(build, dict):
        raise ConfigError(f"{source}: field 'build' must be an object")
    try:
        limits = {key: int_field(build, key, minimum=1) for key in DEFAULT_SETTINGS}
    except ValueError as exc:
        raise ConfigError(f"{source}: build {exc}") from None
    if limits["max_input_len"] > limits["max_seq_len"]:
        raise ConfigError(f"{source}: build field 'max_input_len' {limits['max_input_len']} exceeds 'max_seq_len'")
    if not isinstance(config["checkpoint"], dict):
        raise ConfigError(f"{source}: field 'checkpoint' must be an object")
    mapping = CheckpointConfig.from_json(config["checkpoint"], f"{source}: checkpoint").mapping
    for field in ("graphs", "ranks"):
        value = config.get(field, [{}] * mapping.world_size)
        if not isinstance(value, list) or len(value) != mapping.world_size or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{source}: field {field!r} must be a list of {mapping.world_size} object(s), one per rank")
    return mapping


def read_engine_config(engine_dir: Path) -> dict[str, Any]:
    """Read and check an engine's config.json; errors name the file and field."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UsageError(f"{engine_dir}: engine directory not found")
    path = engine_dir / "config.json"
    config = read_json(path, "engine config")
    check_engine_config(config, str(path))
    return config


def engine_checkpoint(engine_config: dict[str, Any]) -> CheckpointConfig:
    """The checkpoint config an engine was built from (its ``checkpoint`` field), typed.

    ``engine_config`` is one :func:`read_engine_config` returned (or :func:`build_engine` wrote), so
    the field has been checked already."""
    return CheckpointConfig.from_json(engine_config["checkpoint"], "engine config.json: checkpoint")


def engine_mapping(engine_config: dict[str, Any]) -> Mapping:
    """The parallel mapping of an engine's ranks."""
    return engine_checkpoint(engine_config).mapping


def engine_graph(registry: Registry, engine_config: dict[str, Any], rank: int) -> Graph:
    """Rank ``rank``'s IR as stored at build time, validated against the loaded ops."""
    try:
        return validate(Graph.from_json(engine_config["graphs"][rank]), registry.ops)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"engine config.json: graph of rank {rank} is unreadable ({exc})") from None


def load_rank_session(
    registry: Registry, engine_dir: Path, rank: int, device: str, engine_config: dict[str, Any] | None = None
):
    """Load rank ``rank`` with the backend recorded in the engine."""
    engine_config = engine_config or read_engine_config(engine_dir)
    backend = registry.backend(engine_config["backend"], str(Path(engine_dir) / "config.json"))
    return backend.load_rank(Path(engine_dir), engine_config, rank, device, registry)


def describe_engine(registry: Registry, engine_dir: Path, raw: dict[str, Any], max_nodes: int | None) -> str:
    config = read_engine_config(engine_dir)
    ckpt = engine_checkpoint(config)
    mapping = ckpt.mapping
    lines = [
        f"engine {engine_dir} (backend {config['backend']})",
        f"  architecture: {ckpt.architecture}  dtype: {ckpt.dtype}  "
        f"mapping: tp={mapping.tp_size} pp={mapping.pp_size}  build: {config['build']}",
        f"  quantization: {ckpt.quantization.to_json()}",
    ]
    backend = registry.backends.get(config["backend"])
    for rank in mapping.ranks():
        extra = backend.describe_rank(Path(engine_dir), config, rank) if backend is not None else ""
        if extra:
            lines.append(f"  rank {rank} artefacts:\n{extra}")
        elif config.get("ranks") and config["ranks"][rank]:
            lines.append(f"  rank {rank} artefacts: {config['ranks'][rank]}")
        lines.append(format_graph(engine_graph(registry, config, rank), max_nodes=max_nodes))
    return "\n".join(lines)
