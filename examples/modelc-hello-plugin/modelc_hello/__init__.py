"""modelc-hello-plugin: the smallest useful modelc plugin.

It uses only modelc's public surface: ``compiler_core.hookimpl``, the IR (``OpSpec``,
``GraphBuilder``, ``validate``), the registry the CLI passes its commands (on the click context's
host) and the reference executor. It provides

* an IR op, ``hello_scale`` (``y = x * factor``), declared through ``register_ops``;
* that op's torch kernel, a ``Lowering(op, "torch", fn)`` through ``register_lowerings`` (so the
  reference executor and the torch backend can run any graph that contains it);
* a subcommand, ``modelc hello``, through ``register_commands``: it builds a one-node graph
  with the op, validates it and runs it with the reference executor.
"""

from __future__ import annotations

from typing import Any

import click

from compiler_core import hookimpl
from compiler_core.cli.options import option
from compiler_core.host import Host
from compiler_core.ir import Graph, GraphBuilder, Node, OpSpec
from compiler_core.lowering import Lowering
from compiler_core.registry import Registry

__version__ = "0.3.0"

HELLO_SCALE = OpSpec(
    "hello_scale",
    "Elementwise x * factor (the modelc-hello-plugin example op).",
    attrs=("factor",),
)


@hookimpl
def register_ops(register) -> None:
    register(HELLO_SCALE)


def lower_hello_scale(node: Node, context: Any):
    """The torch kernel of one ``hello_scale`` node: ``fn(ctx, x) -> x * factor``."""
    factor = float(node.attrs["factor"])
    return lambda ctx, x: x * factor


@hookimpl
def register_lowerings(register) -> None:
    # One entry per (op, backend) this plugin can run; other backends simply have no lowering of it.
    register(Lowering(HELLO_SCALE.name, "torch", lower_hello_scale))


def hello_graph(factor: float) -> Graph:
    """A one-node graph: ``y = hello_scale(x, factor)``."""
    g = GraphBuilder("hello")
    y = g.add(HELLO_SCALE.name, ["x"], name="scale", factor=factor)
    return g.build(["x"], [y], attrs={"dtype": "float32"})


def run_hello(registry: Registry, values: list[float], factor: float) -> list[float]:
    """Validate the hello graph against ``registry``'s ops (every loaded plugin's) and run it with
    modelc's executor, which lowers it through the same plugins."""
    import torch

    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.ir import validate
    from compiler_core.runtime.context import ForwardContext

    graph = validate(hello_graph(factor), registry.ops)
    executor = GraphExecutor(registry, graph, weights={})
    x = torch.tensor([values], dtype=torch.float32)
    ctx = ForwardContext.for_prompt(torch.ones(x.shape, dtype=torch.long))
    (y,) = executor.run({"x": x}, ctx).values()
    return y[0].tolist()


@click.command("hello")
@option("--name", default="modelc", show_default=True, help="Who to greet.")
@option("--scale_factor", default=2.0, show_default=True, type=float, help="The hello_scale op's factor.")
@click.pass_obj
def hello_command(host: Host, name: str, scale_factor: float) -> None:
    """Greet, then run a one-op graph of this plugin through modelc's reference executor."""
    values = [1.0, 2.0, 3.0]
    result = run_hello(host.registry, values, scale_factor)
    click.echo(f"hello, {name}!")
    click.echo(f"hello_scale({values}, factor={scale_factor}) = {result}  (validated and run by modelc)")


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(hello_command)
