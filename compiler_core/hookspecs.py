"""Hook specifications: the whole surface a modelc plugin can implement.

Plugins implement these with ``@compiler_core.hookimpl`` and register through the
``compiler_core`` entry-point group. Two shapes exist:

* ``register_*`` hooks run once per process. They receive a ``register`` callback; the core
  owns the resulting registry and refuses duplicate names, naming both plugins.
* Per-layer dispatch hooks are ``firstresult``: every implementation is asked in turn (plugins
  before the core's own defaults, which are ``trylast``) and the first non-None answer wins.
  Returning None means "not mine, ask the next implementation".

Implementations may accept fewer arguments than a spec lists, so specs can grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import click
    import torch

    from compiler_core.ir import Graph, Node, OpSpec
    from compiler_core.mapping import Mapping as ParallelMapping
    from compiler_core.registry import Architecture, Backend, QuantScheme, ScaleGroup

hookspec = pluggy.HookspecMarker("compiler_core")
hookimpl = pluggy.HookimplMarker("compiler_core")


# --- registration --------------------------------------------------------------------------


@hookspec
def register_ops(register: Callable[[OpSpec], None]) -> None:
    """Declare IR op kinds.

    Call ``register(OpSpec(...))`` once per op the plugin's graphs or lowerings use. The
    validator rejects graphs with ops nobody registered. Registering a name twice is an error
    that names both plugins; registering something that is not an OpSpec, or raising here, is
    an error naming this plugin. Returns nothing (the return value is ignored).
    """


@hookspec
def register_architectures(register: Callable[[Architecture], None]) -> None:
    """Declare model families.

    Call ``register(arch)`` with an :class:`compiler_core.registry.Architecture`. The core
    picks the architecture whose ``detect(hf_config)`` is true for a Hugging Face config, and
    the one named in a checkpoint's ``config.json`` when reading it back. Returns nothing
    (the return value is ignored).
    """


@hookspec
def register_quant_schemes(register: Callable[[QuantScheme], None]) -> None:
    """Declare quantization schemes.

    Call ``register(scheme)`` with a :class:`compiler_core.registry.QuantScheme`; its ``name``
    is the ``--qformat`` users pass to ``modelc quantize``. Returns nothing (the return value
    is ignored).
    """


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Declare execution backends.

    Call ``register(backend)`` with a :class:`compiler_core.registry.Backend`; its ``name`` is
    what ``modelc build --backend`` accepts. Returns nothing (the return value is ignored).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``modelc`` click group.

    ``cli`` is a click group to attach to: use ``@cli.command()`` or ``cli.add_command(cmd)``.
    Each plugin's commands are collected separately, so a command name two plugins add is an
    error naming both. The core's own commands arrive through this same hook. Returns nothing
    (the return value is ignored).
    """


# --- weights -------------------------------------------------------------------------------


@hookspec(firstresult=True)
def map_weight(config: Mapping[str, Any], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Translate one source-checkpoint tensor into IR parameters.

    ``config`` is the normalised model config (its ``architecture`` key says whose model it
    is); ``name`` and ``tensor`` come from the Hugging Face checkpoint, in its own dtype.
    Return a dict of IR parameter name to tensor (several when one source tensor feeds several
    parameters, an empty dict to drop the tensor on purpose), or None when the tensor is not
    this plugin's to map. A tensor that no plugin maps is an error naming it.

    Before any weight is read, the core calls this with ``meta`` tensors (shape and dtype, no
    data) to check a safetensors checkpoint against its config: use only operations on shapes,
    layouts and dtypes, never the values.
    """


# --- sharding ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pipeline_layer_ranges(config: Mapping[str, Any], pp_size: int) -> list[range] | None:
    """Split the decoder layers of the model ``config`` describes into ``pp_size`` contiguous stages.

    ``config`` is the normalised checkpoint config (``architecture`` says whose model it is).
    Return one ``range`` of global layer indices per stage (uneven splits allowed, every
    layer in exactly one stage), or None to accept the core's default, which gives the first
    ``num_layers % pp_size`` stages one extra layer.
    """


@hookspec(firstresult=True)
def shard_param(
    name: str,
    tensor: torch.Tensor,
    graph: Graph,
    config: Mapping[str, Any],
    mapping: ParallelMapping,
    rank: int,
) -> torch.Tensor | None:
    """Return rank ``rank``'s slice of the full parameter ``tensor``.

    ``name`` is the IR parameter name; ``graph`` is the rank's graph, whose ``params[name]``
    gives the shape the slice must have; ``config`` is the checkpoint config and ``mapping``
    the :class:`compiler_core.mapping.Mapping` (tp/pp sizes, ``mapping.tp_rank(rank)``).
    Implement this for layouts that a plain split cannot express (fused QKV reordered per
    rank, KV heads duplicated when tp_size exceeds them, a quantized weight with its scales).
    Return None to leave the parameter to later implementations; the core's default (last)
    is shape-driven: it replicates a parameter whose rank shape equals the full shape,
    otherwise splits the one axis that differs into tp_size chunks, zero-padding the tail
    (a padded vocabulary), and raises ValueError when no single axis explains the shapes.
    """


# --- quantization --------------------------------------------------------------------------


@hookspec(firstresult=True)
def quantize_layer(
    node: Node,
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    scheme: QuantScheme,
    stats: Mapping[str, Any],
) -> tuple[list[Node], dict[str, torch.Tensor]] | None:
    """Quantize one node of a full-precision graph.

    ``graph`` is the full-precision single-rank graph holding ``node``; ``weights`` maps its
    parameter names to full-precision tensors; ``scheme`` is the registered
    :class:`compiler_core.registry.QuantScheme` being applied. ``stats`` holds what
    calibration recorded for this node (e.g. input and weight amax,
    AWQ scales). Return the replacement nodes and the new parameter tensors (which replace
    any of the node's old ones by name), or None when this implementation does not quantize
    this node for ``scheme``; a node nobody quantizes stays as it is.
    """


@hookspec(firstresult=True)
def scale_groups(graph: Graph, config: Mapping[str, Any]) -> list[ScaleGroup] | None:
    """Name the linears that read the same activation, for activation-aware schemes (AWQ).

    ``graph`` is a full-precision single-rank graph of the model ``config`` describes.
    Return a list of :class:`compiler_core.registry.ScaleGroup`: each has the node whose
    output is the shared input (a norm, an activation or a linear) and the linear nodes that
    read it, so one per-channel scale can be folded into that producer. Return None when this
    plugin does not know ``config``'s architecture.
    """


# --- lowering ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lower_layer(node: Node, graph: Graph, backend: str, context: Any) -> Any:
    """Lower one IR node for one backend.

    ``node`` belongs to ``graph`` (the rank's whole graph, for looking up parameter shapes
    and dtypes). ``backend`` is a registered backend name; ``context`` is that backend's lowering context:
    for ``torch`` a :class:`compiler_core.backends.torch.kernels.TorchLowering` (weights, device),
    and for other backends whatever they document. Return the backend's lowered form (for
    ``torch`` a callable ``fn(ctx, *inputs) -> output``), or None when this implementation
    does not lower ``node.op`` for ``backend``. A quantization scheme lowers its own ops for
    every backend it supports through this hook.
    """
