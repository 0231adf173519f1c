"""The core's own hook implementations: core ops, their torch kernels, the torch backend and the
core CLI commands. Registered like any plugin (name ``core``); its ``lower_layer`` is ``trylast``
so plugins can override it.
"""

from __future__ import annotations

from typing import Any

from compiler_core.backends.torch.backend import TorchBackend
from compiler_core.backends.torch.kernels import CORE_KERNELS
from compiler_core.cli.commands import CORE_COMMANDS
from compiler_core.hookspecs import hookimpl
from compiler_core.ir import CORE_OPS, Graph, Node


@hookimpl
def register_ops(register) -> None:
    for spec in CORE_OPS:
        register(spec)


@hookimpl
def register_backends(register) -> None:
    register(TorchBackend())


@hookimpl
def register_commands(cli) -> None:
    for command in CORE_COMMANDS:
        cli.add_command(command)


@hookimpl(trylast=True)
def lower_layer(node: Node, graph: Graph, backend: str, context: Any):
    if backend != "torch":
        return None
    lower = CORE_KERNELS.get(node.op)
    return None if lower is None else lower(node, context)
