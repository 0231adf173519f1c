"""Triton is optional (the ``gpu`` extra): without it the torch backend lowers and runs every fused
pattern on the CPU, the quantized GEMMs with their GELU / channel-scale epilogues included.

A real subprocess whose import system cannot find ``triton``, as on a machine where it is not
installed (the README's first command installs none).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.machinery
    import importlib.util
    import sys

    class WithoutTriton(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.split(".")[0] == "triton" else super().find_spec(name, path, target)

    sys.meta_path[:] = [WithoutTriton if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert importlib.util.find_spec("triton") is None

    import torch

    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.formats.checkpoint_config import CheckpointConfig, QuantConfig
    from compiler_core.host import Host
    from compiler_core.ir import GraphBuilder
    from compiler_core.mapping import Mapping
    from compiler_core.runtime.context import ForwardContext
    from modelc_plugins.quant_awq.int4 import pack_int4, quantize_groups
    from modelc_plugins.quant_awq.transform import awq_quantization, transform_graph

    width, hidden, group = 64, 96, 32
    g = GraphBuilder("awq_mlp")
    fc = g.param("fc.weight", [hidden, width], "float32")
    proj = g.param("proj.weight", [width, hidden], "float32")
    h = g.add("linear", ["x"], name="fc", params={"weight": fc}, parallel="column")
    y = g.add("linear", [g.add("gelu", [h], name="act")], name="proj", params={"weight": proj}, parallel="row")
    graph = g.build(["x"], [y], attrs={"dtype": "float32"})
    quantization = awq_quantization(QuantConfig(), group, [], ["fc", "proj"])
    graph = transform_graph(graph, CheckpointConfig("t", "float32", Mapping(), {}, quantization))
    weights = {}
    for name, shape in (("fc", (hidden, width)), ("proj", (width, hidden))):
        codes, scales = quantize_groups(torch.randn(*shape), group, scale_dtype=torch.float32)
        weights[name + ".weight"], weights[name + ".weights_scaling_factor"] = pack_int4(codes), scales
        weights[name + ".prequant_scaling_factor"] = torch.rand(shape[1]) + 0.5
    executor = GraphExecutor(Host.load().registry, graph, weights, "cpu")
    fused = [step.fused.name for step in executor.steps if step.fused is not None]
    assert "int4_gemm+gelu+channel_scale" in fused, fused
    context = ForwardContext.for_prompt(torch.ones(1, 2, dtype=torch.long))
    (out,) = executor.run({"x": torch.randn(1, 2, width)}, context).values()
    assert out.shape == (1, 2, width) and bool(out.isfinite().all())
    assert "triton" not in sys.modules
    print("ran without triton")
    """
)


def test_the_torch_backend_lowers_and_runs_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran without triton" in proc.stdout
