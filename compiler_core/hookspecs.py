"""Hook specifications: the whole surface a modelc plugin can implement.

Plugins implement these with ``@compiler_core.hookimpl`` and register through the
``compiler_core`` entry-point group. Two shapes exist:

* ``register_*`` hooks run once per :class:`compiler_core.host.Host`. They receive a ``register``
  callback; the host owns the resulting registry and refuses duplicate names, naming both plugins.
* ``lower_layer`` is a broadcast: every implementation is asked in turn (plugins before the
  core's own, which is ``trylast``) and the first non-None answer wins. Returning None means
  "not mine, ask the next implementation".

Behaviour that belongs to one registered object is a method of it, not a hook: weight mapping,
sharding, pipeline stages and AWQ scale groups are methods of the
:class:`compiler_core.api.Architecture` a checkpoint names, and quantizing a layer is a method of
the :class:`compiler_core.api.QuantScheme` being applied (core defaults in those base classes).

Implementations may accept fewer arguments than a spec lists, so specs can grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import click

    from compiler_core.api import Architecture, Backend, QuantScheme
    from compiler_core.ir import Graph, Node, OpSpec

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
