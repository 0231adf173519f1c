"""Open a built engine for generation, in this process or across the ranks of an MPI job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from compiler_core.build.engine import engine_checkpoint, engine_mapping, load_rank_session, read_engine_config
from compiler_core.errors import MissingDependencyError, TokenizerError, UsageError
from compiler_core.formats.checkpoint import TOKENIZER_DIR
from compiler_core.graph_attrs import stop_token_ids
from compiler_core.host import load_registry
from compiler_core.registry import Registry
from compiler_core.runtime.runner import LocalRunner, ModelRunner

#: Environment variables in which MPI launchers (Open MPI, MPICH/Intel MPI/PMI, PMIx) publish rank and size.
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return default


def mpi_world_size() -> int:
    """Number of processes of the MPI job this process belongs to (1 outside mpirun)."""
    return _env_int(_SIZE_VARS, 1)


def mpi_rank() -> int:
    """This process's rank in its MPI job (0 outside mpirun)."""
    return _env_int(_RANK_VARS, 0)


def is_output_rank() -> bool:
    """True on the one process that prints results and writes output files (rank 0)."""
    return mpi_rank() == 0


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when a GPU is usable, else cpu; an explicit cuda without a GPU is a usage error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return device


def _job_error(message: str) -> UsageError:
    """An error every rank of the job hits alike: rank 0 reports it, the others exit quietly."""
    error = UsageError(message)
    error.quiet = mpi_rank() != 0
    return error


def open_runner(
    engine_dir: Path, device: str = "auto", registry: Registry | None = None
) -> tuple[ModelRunner, dict[str, Any]]:
    """A runner for every rank of the engine and the engine's config.

    A single-rank engine runs here; a multi-rank engine needs one MPI process per rank
    (``mpirun -n W``), each of which opens its own rank. The runner carries the engine's build
    limits, which :func:`compiler_core.runtime.generation.generate` enforces. ``registry`` holds
    the plugins to use (default: the installed ones, loaded for this call).
    """
    registry = registry or load_registry()
    engine_dir = Path(engine_dir)
    config = read_engine_config(engine_dir)
    mapping = engine_mapping(config)
    device = resolve_device(device)
    size = mpi_world_size()
    if mapping.world_size == 1:
        if size > 1:
            raise _job_error(f"{engine_dir}: engine has world_size 1; run it without mpirun (or with -n 1)")
        runner: ModelRunner = LocalRunner([load_rank_session(registry, engine_dir, 0, device, config)], mapping)
    else:
        if size != mapping.world_size:
            raise _job_error(
                f"{engine_dir}: engine has world_size {mapping.world_size}; run it with "
                f"`mpirun -n {mapping.world_size} modelc ...`"
                + (f" (this job has {size} processes)" if size > 1 else "")
            )
        from compiler_core.runtime.distributed import open_distributed_runner

        runner = open_distributed_runner(registry, engine_dir, config, device)
    runner.build_limits = dict(config["build"])
    return runner, config


def load_tokenizer(engine_dir: Path, tokenizer_dir: Path | None = None, required: bool = True):
    """The tokenizer from ``tokenizer_dir``, else the one saved with the engine (``tokenizer/``).

    Returns None when neither exists and ``required`` is false.
    """
    source = Path(tokenizer_dir) if tokenizer_dir is not None else Path(engine_dir) / TOKENIZER_DIR
    if not source.is_dir():
        if tokenizer_dir is not None:
            raise TokenizerError(f"--tokenizer_dir {source}: directory not found")
        if not required:
            return None
        raise TokenizerError(f"{engine_dir}: the engine has no tokenizer/ directory; pass --tokenizer_dir D")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("reading text needs transformers: pip install 'modelc[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{source}: not a loadable tokenizer ({exc})") from None


def stop_ids(engine_config: dict[str, Any], tokenizer=None) -> tuple[int, ...]:
    """Every stop token: the model config's eos ids (one or several), else the tokenizer's eos."""
    ids = stop_token_ids(engine_checkpoint(engine_config).model, "engine config.json")
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = (tokenizer.eos_token_id,)
    return ids


def special_ids(engine_config: dict[str, Any], tokenizer=None) -> tuple[int | None, int | None]:
    """(end_id, pad_id): the first stop id (:func:`stop_ids`), and the model config's pad id, else
    the tokenizer's; pad falls back to end."""
    stops = stop_ids(engine_config, tokenizer)
    end_id = stops[0] if stops else None
    pad_id = engine_checkpoint(engine_config).model.get("pad_token_id")
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_token_id
    return end_id, end_id if pad_id is None else pad_id
