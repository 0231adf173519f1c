"""Tests of the example plugin, written the way a plugin author would test theirs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.ir import GraphError, validate


def test_op_is_registered_by_this_plugin(hello_plugin, host):
    registry = host.registry
    assert registry.ops["hello_scale"] is hello_plugin.HELLO_SCALE
    assert registry.provided_by[("ops", "hello_scale")] == "hello"
    assert host.commands.provided_by[("commands", "hello")] == "hello"


def test_validator_uses_the_op_signature(hello_plugin, host):
    graph = hello_plugin.hello_graph(2.0)
    validate(graph, host.registry.ops)
    no_factor = graph.replace(nodes=(graph.nodes[0].replace(attrs={}),))
    with pytest.raises(GraphError, match=r"node scale .*missing attribute 'factor'"):
        validate(no_factor, host.registry.ops)


def test_torch_kernel_through_register_lowerings(hello_plugin, host):
    graph = hello_plugin.hello_graph(-1.5)
    table = host.registry.lowerings
    kernel = table.lowering("hello_scale", "torch").fn(graph.nodes[0], None)
    x = torch.randn(2, 5)
    assert torch.equal(kernel(None, x), x * -1.5)
    assert host.registry.provided_by[("lowerings", "torch:hello_scale")] == "hello"
    # Other backends are not this plugin's business: they have no lowering of the op.
    assert table.lowering("hello_scale", "onnx") is None


def test_executor_runs_the_op(hello_plugin, host):
    assert hello_plugin.run_hello(host.registry, [1.0, -2.0, 0.5], 4.0) == [4.0, -8.0, 2.0]


@pytest.mark.parametrize("flag", ["--scale_factor", "--scale-factor"])
def test_hello_command(host, flag):
    result = CliRunner().invoke(cli, ["hello", "--name", "Ada", flag, "3"], obj=host)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "hello, Ada!",
        "hello_scale([1.0, 2.0, 3.0], factor=3.0) = [3.0, 6.0, 9.0]  (validated and run by modelc)",
    ]
