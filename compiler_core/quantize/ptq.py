"""The generic post-training quantization flow behind ``modelc quantize``.

The core names no scheme: ``--qformat`` is any registered :class:`~compiler_core.api.QuantScheme`
(``registry.quant_schemes``) or ``full_prec`` (weights left as they are), and
``--kv_cache_dtype`` is served by the scheme that lists it in ``kv_cache_dtypes``.

Flow (:func:`quantize`)::

    load_full_model(registry, M, dtype)             # LoadedModel: config + full tp1 weights
    load_calibration_set(M, dataset, ...)           # token batches (compiler_core.quantize.calibration)
    model = weight_scheme.quantize(model, calibration, options)          # unless full_prec
    model = kv_scheme.quantize_kv_cache(model, calibration, options)     # with --kv_cache_dtype
    check_quantized(registry, model)                # weights agree with the rebuilt tp1 graph
    write_model(registry, model, tmp, mapping)      # per-rank graphs via each transform_graph, into
                                                    # atomic_output_dir(O) (checked before calibrating)

``options`` (a plain dict, so it can grow) holds:

    kv_cache_dtype   str | None   the --kv_cache_dtype value
    exclude_modules  list | None  fnmatch patterns of node names to leave unquantized
                                  (None: the scheme's default, typically ["lm_head"])
    group_size       int | None   weights per quantization group for group-wise schemes
                                  (None: the scheme's default)
    mapping          Mapping      the output's tp/pp split, for schemes whose layouts must
                                  divide per rank (checked before calibrating)
    device           str          where calibration runs ("cpu", "cuda")
    seed             int          torch is seeded with it before each scheme runs
    show_progress    bool         show progress bars
    registry         Registry     the plugins in use (for graphs: ``model_graph(registry, model)``)
    ...                           any further keyword given to :func:`quantize`

A scheme's ``quantize`` usually: builds ``calibration.model_graph(registry, model)``, records what
it needs with ``calibration.collect_stats``, then calls :func:`quantize_layers`, which asks the
scheme's :meth:`~compiler_core.api.QuantScheme.quantize_layer` for each node, swaps the returned
tensors into ``model.weights``, and finally sets ``model.config`` to a copy (``dataclasses.replace``)
whose ``quantization`` (a frozen :class:`~compiler_core.formats.checkpoint_config.QuantConfig`:
``quant_algo``, ``exclude_modules``, scheme extras) says what it did. That section is all
:func:`compiler_core.model.rank_graph` has to rebuild the quantized graph of any rank: every
scheme's ``transform_graph`` rewrites the full-precision graph from it, so ``transform_graph`` and
the ``quantize_layer`` implementation must agree on node and param names, shapes and dtypes
(:func:`check_quantized` verifies that before anything is written).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compiler_core.api import QuantScheme
from compiler_core.convert.from_hf import LoadedModel, load_full_model, model_config_from_hf, write_model
from compiler_core.dtypes import dtype_name
from compiler_core.errors import ModelcError, OptionError, UsageError
from compiler_core.formats.checkpoint import CHECKPOINT_OUTPUT
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.formats.fileio import atomic_output_dir, check_output_dir
from compiler_core.host import load_registry
from compiler_core.ir import Graph, Node, Param, validate
from compiler_core.mapping import Mapping as ParallelMapping
from compiler_core.model import rank_graph
from compiler_core.progress import progress
from compiler_core.quantize.calibration import (
    DEFAULT_CALIB_SIZE,
    DEFAULT_MAX_SEQ_LENGTH,
    CalibrationSet,
    load_calibration_set,
    model_graph,
)
from compiler_core.registry import Registry

#: ``--qformat`` value that leaves weights in full precision (e.g. to quantize only the KV cache).
FULL_PRECISION = "full_prec"
DEFAULT_SEED = 1234


def qformat_choices(registry: Registry) -> list[str]:
    """Every ``--qformat`` value: the registered schemes, then ``full_prec``."""
    return [*sorted(registry.quant_schemes), FULL_PRECISION]


def kv_cache_dtype_choices(registry: Registry) -> list[str]:
    """Every ``--kv_cache_dtype`` value some registered scheme implements."""
    return sorted({d for s in registry.quant_schemes.values() for d in s.kv_cache_dtypes})


def resolve_schemes(
    registry: Registry, qformat: str, kv_cache_dtype: str | None
) -> tuple[QuantScheme | None, QuantScheme | None]:
    """(weight scheme or None for full_prec, KV-cache scheme or None); UsageError for unknown names."""
    schemes = registry.quant_schemes
    if qformat == FULL_PRECISION:
        weight_scheme = None
    elif qformat in schemes:
        weight_scheme = schemes[qformat]
    else:
        raise UsageError(
            f"--qformat {qformat!r}: unknown quantization format (known: {', '.join(qformat_choices(registry))})"
        )
    kv_scheme = None
    if kv_cache_dtype is not None:
        # Prefer the weight scheme when it also serves this KV type, so one plugin owns both.
        candidates = [weight_scheme] if weight_scheme else []
        candidates += [schemes[n] for n in sorted(schemes)]
        kv_scheme = next((s for s in candidates if kv_cache_dtype in s.kv_cache_dtypes), None)
        if kv_scheme is None:
            known = ", ".join(kv_cache_dtype_choices(registry)) or "none"
            raise UsageError(f"--kv_cache_dtype {kv_cache_dtype!r}: no loaded plugin provides it (known: {known})")
    if weight_scheme is None and kv_scheme is None:
        raise UsageError(
            f"--qformat {FULL_PRECISION} without --kv_cache_dtype quantizes nothing; use `modelc convert` instead"
        )
    return weight_scheme, kv_scheme


def excluded(node_name: str, patterns: Iterable[str]) -> bool:
    """True when ``node_name`` matches one of the fnmatch ``patterns`` (``--exclude_modules``)."""
    return any(fnmatch.fnmatchcase(node_name, p) for p in patterns)


def ir_dtype(tensor: torch.Tensor) -> str:
    """The IR dtype name of a tensor's element type."""
    try:
        return dtype_name(tensor.dtype)
    except KeyError:
        raise ModelcError(f"tensor dtype {tensor.dtype} has no IR dtype") from None


def quantize_layers(
    registry: Registry,
    model: LoadedModel,
    graph: Graph,
    scheme: QuantScheme,
    stats: Mapping[str, Mapping[str, Any]],
    *,
    show_progress: bool = True,
) -> Graph:
    """Quantize the nodes named in ``stats`` with ``scheme.quantize_layer``.

    For each node (in graph order) the scheme gets ``stats[node.name]``; its answer
    ``(nodes, tensors)`` replaces the node in the returned graph, and ``tensors`` replace or
    join ``model.weights`` by name. Parameters the node used and its replacement no longer
    reads are dropped. A node the scheme answers None for stays as it is. Returns the
    rewritten graph, validated against ``registry.ops`` (what ``transform_graph`` must
    reproduce from the config).
    """
    unknown = sorted(set(stats) - {n.name for n in graph.nodes})
    if unknown:
        raise ModelcError(f"graph {graph.name}: no node {unknown[0]!r} to quantize")
    params: dict[str, Param] = dict(graph.params)
    replaced: dict[str, list[Node]] = {}
    todo = [n for n in graph.nodes if n.name in stats]
    for node in progress(todo, desc=f"quantize ({scheme.name})", unit="layer", enable=show_progress):
        answer = scheme.quantize_layer(node, graph, model.weights, stats[node.name])
        if answer is None:
            continue
        new_nodes, tensors = answer
        replaced[node.name] = list(new_nodes)
        for name, tensor in tensors.items():
            model.weights[name] = tensor
            params[name] = Param(name, tuple(tensor.shape), ir_dtype(tensor))
    nodes = [new for node in graph.nodes for new in replaced.get(node.name, [node])]
    still_read = {p for n in nodes for p in n.params.values()}
    for name in set(graph.params) - still_read:
        params.pop(name, None)
        model.weights.pop(name, None)
    return validate(graph.replace(nodes=tuple(nodes), params=params), registry.ops)


def check_quantized(registry: Registry, model: LoadedModel) -> Graph:
    """Check that ``model.weights`` match the tp1 graph its config rebuilds; return that graph."""
    graph = model_graph(registry, model)
    for name, param in graph.params.items():
        tensor = model.weights.get(name)
        if tensor is None:
            raise ModelcError(f"quantized model: parameter {name} of the rebuilt graph has no tensor")
        if tuple(tensor.shape) != param.shape or ir_dtype(tensor) != param.dtype:
            raise ModelcError(
                f"quantized model: parameter {name} is {ir_dtype(tensor)}{list(tensor.shape)}, "
                f"the rebuilt graph wants {param.dtype}{list(param.shape)}"
            )
    return graph


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")
    return device


def quantize(
    model_dir: Path,
    output_dir: Path,
    *,
    qformat: str,
    kv_cache_dtype: str | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    calib_dataset: Path | None = None,
    calib_max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    batch_size: int = 1,
    dtype: str = "auto",
    mapping: ParallelMapping | None = None,
    exclude_modules: list[str] | None = None,
    group_size: int | None = None,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    show_progress: bool = True,
    tokenizer_dir: Path | None = None,
    registry: Registry | None = None,
    **scheme_options: Any,
) -> tuple[CheckpointConfig, CalibrationSet]:
    """Quantize a Hugging Face checkpoint into a sharded modelc checkpoint; return its config and
    the calibration set used. ``scheme_options`` reach the schemes' ``options`` unchanged;
    ``registry`` holds the plugins to use (default: the installed ones, loaded for this call) and
    reaches the schemes as ``options["registry"]``."""
    registry = registry or load_registry()
    mapping = mapping or ParallelMapping()
    if group_size is not None and group_size < 1:
        raise OptionError(f"--group_size must be at least 1, got {group_size}")
    weight_scheme, kv_scheme = resolve_schemes(registry, qformat, kv_cache_dtype)
    device = resolve_device(device)
    config = model_config_from_hf(registry, model_dir, dtype, mapping)
    for rank in mapping.ranks():
        rank_graph(registry, config, rank)  # fail on a bad split before loading and calibrating
    inputs = [Path(model_dir), *([Path(calib_dataset)] if calib_dataset is not None else [])]
    check_output_dir(Path(output_dir), CHECKPOINT_OUTPUT, inputs)  # and on a refused output before calibrating
    calibration = load_calibration_set(
        model_dir,
        calib_dataset,
        num_samples=calib_size,
        max_seq_length=calib_max_seq_length,
        batch_size=batch_size,
        tokenizer_dir=tokenizer_dir,
    )
    model = load_full_model(registry, model_dir, config.dtype, show_progress)
    options: dict[str, Any] = {
        **scheme_options,
        "registry": registry,
        "kv_cache_dtype": kv_cache_dtype,
        "exclude_modules": exclude_modules,
        "group_size": group_size,
        "mapping": mapping,
        "device": device,
        "seed": seed,
        "show_progress": show_progress,
    }
    if weight_scheme is not None:
        torch.manual_seed(seed)
        model = weight_scheme.quantize(model, calibration, options)
    if kv_scheme is not None:
        torch.manual_seed(seed)
        model = kv_scheme.quantize_kv_cache(model, calibration, options)
    summary = {
        "dataset": calibration.source,
        "num_samples": calibration.num_samples,
        "num_tokens": calibration.num_tokens,
        "max_seq_length": calib_max_seq_length,
        "seed": seed,
    }
    quantization = model.config.quantization
    model.config = replace(
        model.config, quantization=replace(quantization, extras={**quantization.extras, "calibration": summary})
    )
    check_quantized(registry, model)
    with atomic_output_dir(Path(output_dir), CHECKPOINT_OUTPUT, inputs) as tmp:
        write_model(registry, model, tmp, mapping, show_progress)
    return model.config, calibration
