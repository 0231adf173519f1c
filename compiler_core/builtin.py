"""The core's own hook implementations: core ops, their torch lowerings and fused patterns, the
torch backend and the core CLI commands. Registered like any plugin (name ``core``).
"""

from __future__ import annotations

from compiler_core.backends.torch import fused
from compiler_core.backends.torch.backend import TorchBackend
from compiler_core.backends.torch.kernels import CORE_KERNELS
from compiler_core.backends.torch.quant import QUANT_KERNELS
from compiler_core.cli.commands import CORE_COMMANDS
from compiler_core.hookspecs import hookimpl
from compiler_core.ir import CORE_OPS
from compiler_core.lowering import Lowering


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


@hookimpl
def register_lowerings(register) -> None:
    for op, lower in {**CORE_KERNELS, **QUANT_KERNELS}.items():
        register(Lowering(op, "torch", lower))
    for pattern in fused.PATTERNS:
        register(pattern)
