"""Tests of the example plugin, written the way a plugin author would test theirs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.ir import GraphError, validate
from compiler_core.registry import get_commands, get_registry


def test_op_is_registered_by_this_plugin(hello_plugin):
    registry = get_registry()
    assert registry.ops["hello_scale"] is hello_plugin.HELLO_SCALE
    assert registry.provided_by[("ops", "hello_scale")] == "hello"
    assert get_commands().provided_by[("commands", "hello")] == "hello"


def test_validator_uses_the_op_signature(hello_plugin):
    graph = hello_plugin.hello_graph(2.0)
    validate(graph, get_registry().ops)
    no_factor = graph.replace(nodes=(graph.nodes[0].replace(attrs={}),))
    with pytest.raises(GraphError, match=r"node scale .*missing attribute 'factor'"):
        validate(no_factor, get_registry().ops)


def test_torch_kernel_through_register_lowerings(hello_plugin):
    graph = hello_plugin.hello_graph(-1.5)
    table = get_registry().lowerings
    kernel = table.lowering("hello_scale", "torch").fn(graph.nodes[0], None)
    x = torch.randn(2, 5)
    assert torch.equal(kernel(None, x), x * -1.5)
    assert get_registry().provided_by[("lowerings", "torch:hello_scale")] == "hello"
    # Other backends are not this plugin's business: they have no lowering of the op.
    assert table.lowering("hello_scale", "onnx") is None


def test_executor_runs_the_op(hello_plugin):
    assert hello_plugin.run_hello([1.0, -2.0, 0.5], 4.0) == [4.0, -8.0, 2.0]


@pytest.mark.parametrize("flag", ["--scale_factor", "--scale-factor"])
def test_hello_command(hello_plugin, flag):
    result = CliRunner().invoke(cli, ["hello", "--name", "Ada", flag, "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "hello, Ada!",
        "hello_scale([1.0, 2.0, 3.0], factor=3.0) = [3.0, 6.0, 9.0]  (validated and run by modelc)",
    ]
