"""The fp8_linear op: graph rewrite, the torch FP8 GEMM it lowers to (emulated and torch._scaled_mm) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.backends.torch.fused import fp8
from compiler_core.formats.checkpoint_config import QuantConfig
from compiler_core.ir import GraphBuilder, validate
from compiler_core.runtime.context import ForwardContext
from modelc_plugins.quant_fp8 import numerics
from modelc_plugins.quant_fp8.scheme import rewrite_graph
from modelc_plugins.quant_fp8.testing import e4m3_table


def linear_graph(dtype: str, out_features: int = 48, in_features: int = 32):
    g = GraphBuilder("one_linear")
    w = g.param("fc.weight", [out_features, in_features], dtype)
    b = g.param("fc.bias", [out_features], dtype)
    y = g.add("linear", ["x"], name="fc", params={"weight": w, "bias": b}, parallel="column")
    return g.build(["x"], [y], attrs={"dtype": dtype})


def quantized_weights(dtype: torch.dtype, out_features: int = 48, in_features: int = 32):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    w_scale = numerics.scale_from_amax(weight.float().abs().max())
    return {
        "fc.weight": numerics.quantize(weight, w_scale),
        "fc.bias": torch.randn(out_features, generator=gen).to(dtype),
        "fc.weights_scaling_factor": w_scale,
        "fc.activation_scaling_factor": torch.tensor([3.0 / 448]),
    }


def numpy_fp8_linear(x: torch.Tensor, weights) -> np.ndarray:
    """The FP8 GEMM from first principles: codes -> values via the bit table, products in float64."""
    table = e4m3_table()
    a_scale = weights["fc.activation_scaling_factor"].item()
    w_scale = weights["fc.weights_scaling_factor"].item()
    x_codes = numerics.quantize(x, weights["fc.activation_scaling_factor"]).view(torch.uint8).numpy()
    w_codes = weights["fc.weight"].view(torch.uint8).numpy()
    return (table[x_codes] @ table[w_codes].T) * (a_scale * w_scale) + weights["fc.bias"].double().numpy()


def test_rewrite_turns_linears_into_fp8_linear_with_scales(registry):
    graph = rewrite_graph(linear_graph("float32"), QuantConfig(quant_algo="FP8", exclude_modules=()))
    validate(graph, registry.ops)
    (node,) = graph.nodes
    assert node.op == "fp8_linear" and node.attrs == {"parallel": "column"}
    assert graph.params["fc.weight"].dtype == "float8_e4m3fn"
    assert graph.params["fc.bias"].dtype == "float32"
    for role, name in (
        ("weights_scaling_factor", "fc.weights_scaling_factor"),
        ("activation_scaling_factor", "fc.activation_scaling_factor"),
    ):
        assert node.params[role] == name
        assert (graph.params[name].shape, graph.params[name].dtype) == ((1,), "float32")
    untouched = rewrite_graph(linear_graph("float32"), QuantConfig(quant_algo="FP8", exclude_modules=("f*",)))
    assert untouched.nodes[0].op == "linear"
    assert rewrite_graph(linear_graph("float32"), QuantConfig(quant_algo="W4A16_AWQ")) == linear_graph("float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_kernel_is_the_fp8_gemm(registry, dtype):
    torch_dtype = getattr(torch, dtype)
    graph = rewrite_graph(linear_graph(dtype), QuantConfig(quant_algo="FP8", exclude_modules=()))
    weights = quantized_weights(torch_dtype)
    x = (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)) * 2).to(torch_dtype)
    x[0, 0, 0] = 50.0  # beyond the calibrated range: saturates at 448 * scale
    ctx = ForwardContext.for_prompt(torch.ones(2, 5, dtype=torch.long))
    (y,) = GraphExecutor(registry, graph, weights).run({"x": x}, ctx).values()
    assert y.dtype == torch_dtype and y.shape == (2, 5, 48)
    want = numpy_fp8_linear(x, weights)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


def test_float16_kernel_does_not_overflow_on_full_range_codes(registry):
    """A dot product of 32 codes of 448 is 6.4e6, far beyond float16's 65504; the scaled result is small."""
    graph = rewrite_graph(linear_graph("float16"), QuantConfig(quant_algo="FP8", exclude_modules=()))
    weights = quantized_weights(torch.float16)
    weights["fc.weight"] = torch.full((48, 32), 448.0).to(torch.float8_e4m3fn)
    weights["fc.weights_scaling_factor"] = torch.tensor([1 / 448])
    x = torch.full((1, 1, 32), 3.0, dtype=torch.float16)  # = the activation amax: code 448
    ctx = ForwardContext.for_prompt(torch.ones(1, 1, dtype=torch.long))
    (y,) = GraphExecutor(registry, graph, weights).run({"x": x}, ctx).values()
    torch.testing.assert_close(y[0, 0].float(), 96.0 + weights["fc.bias"].float(), rtol=1e-3, atol=1e-3)


def test_scaled_mm_kernel_agrees_with_the_emulated_one():
    """torch._scaled_mm (the Hopper path) with the static scales computes the same GEMM.

    Runs wherever this torch has a _scaled_mm for the tensors' device (CPU builds of torch >= 2.6 do)."""
    weights = quantized_weights(torch.float32, 64, 32)
    args = (
        weights["fc.weight"],
        weights["fc.bias"],
        weights["fc.weights_scaling_factor"].reshape(()),
        weights["fc.activation_scaling_factor"].reshape(()),
        torch.float32,
    )
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    try:
        fast = fp8.scaled_mm_kernel(*args)(None, x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm is not available on CPU here: {exc}")
    slow = fp8.emulated_kernel(*args)(None, x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_cpu_never_takes_the_scaled_mm_path(registry):
    graph = rewrite_graph(linear_graph("float32"), QuantConfig(quant_algo="FP8", exclude_modules=()))
    executor = GraphExecutor(registry, graph, quantized_weights(torch.float32))
    ((step, kernel),) = zip(executor.steps, executor.kernels, strict=True)
    assert step.fused is fp8.FP8_GEMM
    assert kernel.__qualname__.startswith("emulated_kernel")
    assert not fp8.scaled_mm_supported(torch.device("cpu"))
