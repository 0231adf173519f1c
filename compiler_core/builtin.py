"""The core's own hook implementations: core ops, their torch lowerings and fused patterns,
default sharding rules, the torch backend and the core CLI commands. Registered like any plugin
(name ``core``); its dispatch implementations are ``trylast`` so plugins can override them.
"""

from __future__ import annotations

import torch

from compiler_core.hookspecs import hookimpl
from compiler_core.ir import CORE_OPS, Graph
from compiler_core.mapping import Mapping, default_layer_ranges


@hookimpl
def register_ops(register) -> None:
    for spec in CORE_OPS:
        register(spec)


@hookimpl
def register_backends(register) -> None:
    from compiler_core.backends.torch.backend import TorchBackend

    register(TorchBackend())


@hookimpl
def register_commands(cli) -> None:
    from compiler_core.cli import commands

    for command in commands.CORE_COMMANDS:
        cli.add_command(command)


@hookimpl
def register_lowerings(register) -> None:
    from compiler_core.backends.torch import fused
    from compiler_core.backends.torch.kernels import CORE_KERNELS
    from compiler_core.backends.torch.quant import QUANT_KERNELS
    from compiler_core.lowering import Lowering

    for op, lower in {**CORE_KERNELS, **QUANT_KERNELS}.items():
        register(Lowering(op, "torch", lower))
    for pattern in fused.PATTERNS:
        register(pattern)


@hookimpl(trylast=True)
def pipeline_layer_ranges(config, pp_size: int) -> list[range]:
    return default_layer_ranges(int(config["num_hidden_layers"]), pp_size)


@hookimpl(trylast=True)
def shard_param(name: str, tensor: torch.Tensor, graph: Graph, config, mapping: Mapping, rank: int):
    """Shape-driven default: replicate when the rank's shape equals the full one, otherwise
    split the one axis that differs into tp_size chunks (zero-padding the tail when the
    rank's chunk times tp_size exceeds the full size, as for a padded vocabulary)."""
    want = graph.params[name].shape
    have = tuple(tensor.shape)
    if want == have:
        return tensor
    differing = [i for i, (w, h) in enumerate(zip(want, have, strict=True)) if w != h]
    if len(want) != len(have) or len(differing) != 1:
        raise ValueError(f"parameter {name}: cannot derive a split of {list(have)} into {list(want)}")
    axis = differing[0]
    chunk = want[axis]
    total = chunk * mapping.tp_size
    if total < have[axis]:
        raise ValueError(
            f"parameter {name}: {mapping.tp_size} chunks of {chunk} cannot hold axis {axis} of {list(have)}"
        )
    if total > have[axis]:
        pad = list(have)
        pad[axis] = total - have[axis]
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=axis)
    tp_rank = mapping.tp_rank(rank)
    return tensor.narrow(axis, tp_rank * chunk, chunk).contiguous()
