"""Hook specifications: the whole surface a modelc plugin can implement.

Plugins implement these with ``@compiler_core.hookimpl`` and register through the
``compiler_core`` entry-point group. Every hook is a registration: it runs once per
:class:`compiler_core.host.Host` and receives a ``register`` callback (or, for commands, the click
group); the host owns the resulting registry and refuses duplicate names, naming both plugins.
Lowerings are registrations too: entries of a table keyed by (op, backend) that one core loop
(:func:`compiler_core.lowering.plan_lowering`) reads.

Behaviour that belongs to one registered object is a method of it, not a hook: weight mapping,
sharding, pipeline stages and AWQ scale groups are methods of the
:class:`compiler_core.api.Architecture` a checkpoint names, and quantizing a layer is a method of
the :class:`compiler_core.api.QuantScheme` being applied (core defaults in those base classes).

Implementations may accept fewer arguments than a spec lists, so specs can grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import click

    from compiler_core.api import Architecture, Backend, QuantScheme
    from compiler_core.ir import OpSpec
    from compiler_core.lowering import Decomposition, FusedPattern, Lowering

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

    Call ``register(arch)`` with an :class:`compiler_core.api.Architecture`. The core
    picks the architecture whose ``detect(hf_config)`` is true for a Hugging Face config, and
    the one named in a checkpoint's ``config.json`` when reading it back. Returns nothing
    (the return value is ignored).
    """


@hookspec
def register_quant_schemes(register: Callable[[QuantScheme], None]) -> None:
    """Declare quantization schemes.

    Call ``register(scheme)`` with a :class:`compiler_core.api.QuantScheme`; its ``name``
    is the ``--qformat`` users pass to ``modelc quantize``. Returns nothing (the return value
    is ignored).
    """


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Declare execution backends.

    Call ``register(backend)`` with a :class:`compiler_core.api.Backend`; its ``name`` is
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


# --- lowering ------------------------------------------------------------------------------


@hookspec
def register_lowerings(register: Callable[[Lowering | Decomposition | FusedPattern], None]) -> None:
    """Declare how ops run on backends.

    Call ``register(entry)`` once per entry (all three in :mod:`compiler_core.lowering`):

    * ``Lowering(op, backend, fn)``: backend ``backend`` runs ``op`` with ``fn(node, context)``
      (``context``: for ``torch`` a :class:`compiler_core.backends.torch.kernels.TorchLowering`, the
      result a kernel ``fn(ctx, *inputs) -> output``; for ``onnx`` an ``OnnxLowering``, the result the
      ONNX names of the node's outputs).
    * ``Decomposition(op, fn)``: ``fn(node, graph)`` rewrites a node of ``op`` into other ops, in the
      end core primitives (``quantize``, ``dequantize``, ``matmul``, ...): a quantization scheme
      declares its op this way and every backend that lowers the primitives runs it.
    * ``FusedPattern(name, backend, pattern, fn)``: a backend's fast kernel for a tree of ops (an op,
      or the primitives a decomposition produces), taken instead of lowering them one by one.

    The core lowers a graph for a backend with one loop over this table (fused pattern, else the
    backend's lowering, else the decomposition); a node none of them covers is an error naming the
    op and the backend. Registering the same (op, backend), decomposed op or (pattern name, backend)
    twice is an error naming both plugins. ``modelc plugins`` lists each plugin's entries.
    Returns nothing (the return value is ignored).
    """
