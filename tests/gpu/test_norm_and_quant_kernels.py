"""The Triton LayerNorm, FP8 activation quantization and channel scale against torch, and their hook-ins.

Like test_kernels.py these run on a CUDA GPU when there is one, else under Triton's interpreter
(conftest.py). The LayerNorm is compared with ``F.layer_norm`` in float64 (its statistics are
summed in another order, so bit equality is not the contract); the quantization must give
torch's codes exactly, on every E4M3 code, tie and saturated value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from compiler_core.backends.torch import kernels  # noqa: E402
from compiler_core.backends.torch.cuda import layer_norm as triton_ln  # noqa: E402
from compiler_core.backends.torch.cuda.channel_scale import channel_scale  # noqa: E402
from compiler_core.backends.torch.cuda.fp8_quant import quantize_e4m3  # noqa: E402
from compiler_core.backends.torch.fused import fp8  # noqa: E402
from compiler_core.ir import GraphBuilder  # noqa: E402

#: (rows, channels): one row and a batch, channels a power of two, off one (falcon-7b's 4544 scaled
#: down) and odd.
LN_SHAPES = [(1, 64), (3, 71), (5, 1000), (2, 4544)]


def reference_layer_norm(x, weight, bias, eps):
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    return F.layer_norm(x.double(), x.shape[-1:], w, b, eps)


@pytest.mark.parametrize(("rows", "channels"), LN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "none"])
def test_layer_norm_matches_torch(device, rows, channels, dtype, affine):
    gen = torch.Generator().manual_seed(rows * channels)
    x = (torch.randn(rows, channels, generator=gen) * 3 + 2).to(dtype).to(device)
    weight = None if affine == "none" else torch.randn(channels, generator=gen).to(dtype).to(device)
    bias = torch.randn(channels, generator=gen).to(dtype).to(device) if affine == "weight_and_bias" else None
    got = triton_ln.layer_norm(x.view(rows, 1, channels), weight, bias, 1e-5)
    want = reference_layer_norm(x, weight, bias, 1e-5)
    assert got.shape == (rows, 1, channels) and got.dtype == dtype
    # One rounding to the output dtype from float32 statistics: within an ulp of the exact value.
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(got.view(rows, channels).double().cpu(), want.cpu(), rtol=ulp, atol=ulp * 8)


def test_layer_norm_reads_a_strided_row(device):
    """A row that is a slice of a wider tensor (its stride is not its length) is read as it is."""
    wide = torch.randn(4, 96).to(device)
    x = wide[:, 16:80]
    w, b = torch.randn(64).to(device), torch.randn(64).to(device)
    got = triton_ln.layer_norm(x, w, b, 1e-6)
    assert torch.allclose(got.double().cpu(), reference_layer_norm(x.cpu(), w.cpu(), b.cpu(), 1e-6), atol=1e-5)


def e4m3_probe(scale: float) -> torch.Tensor:
    """Every finite E4M3 code, the midpoints between neighbours and values past saturation, times ``scale``."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    return torch.cat([codes, mids, torch.tensor([449.0, 500.0, -1e4, 0.0])]) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.0371])
def test_fp8_quantization_gives_torchs_codes(device, dtype, scale):
    x = e4m3_probe(scale).to(dtype)
    x = torch.cat([x, torch.randn(3000) * 100 * scale]).to(dtype).to(device)
    s = torch.tensor(scale, dtype=torch.float32, device=device)
    want = (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    got = quantize_e4m3(x.view(2, -1) if x.numel() % 2 == 0 else x, s)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.reshape(-1).view(torch.uint8).cpu(), want.view(torch.uint8).cpu())


def layer_norm_graph(channels: int, dtype: str):
    g = GraphBuilder("one_layer_norm")
    w = g.param("ln.weight", [channels], dtype)
    b = g.param("ln.bias", [channels], dtype)
    y = g.add("layer_norm", ["x"], name="ln", params={"weight": w, "bias": b}, eps=1e-5)
    return g.build(["x"], [y], attrs={"dtype": dtype})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the engines of test_engines.py take the kernel")
def test_layer_norm_lowering_takes_the_triton_kernel(monkeypatch):
    """With Triton ready the layer_norm lowering runs the Triton kernel (counted) and gives torch's output."""
    calls = []
    original = triton_ln.layer_norm
    monkeypatch.setattr(triton_ln, "layer_norm", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(kernels, "triton_ready", lambda device: True)
    graph = layer_norm_graph(40, "float32")
    node = graph.nodes[0]
    weights = {"ln.weight": torch.randn(40), "ln.bias": torch.randn(40)}
    low = kernels.TorchLowering(weights, torch.device("cpu"), graph)
    kernel = kernels.lower_layer_norm(node, low)
    calls.clear()  # the load-time probe ran it too
    x = torch.randn(2, 3, 40)
    got = kernel(None, x)
    assert calls
    assert torch.allclose(got, F.layer_norm(x, (40,), weights["ln.weight"], weights["ln.bias"], 1e-5), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is forced through the interpreter's probe")
def test_layer_norm_lowering_keeps_torch_when_the_kernel_disagrees(monkeypatch):
    monkeypatch.setattr(kernels, "triton_ready", lambda device: True)
    monkeypatch.setattr(triton_ln, "layer_norm", lambda x, w, b, eps: torch.zeros_like(x))
    graph = layer_norm_graph(16, "float32")
    low = kernels.TorchLowering({"ln.weight": torch.ones(16), "ln.bias": torch.zeros(16)}, torch.device("cpu"), graph)
    with pytest.warns(UserWarning, match="disagrees"):
        kernel = kernels.lower_layer_norm(graph.nodes[0], low)
    x = torch.randn(1, 16)
    assert torch.allclose(kernel(None, x), F.layer_norm(x, (16,), eps=1e-5), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the FP8 engines take the quantizer for real")
def test_activation_quantizer_takes_the_kernel_only_when_it_agrees(monkeypatch):
    scale = torch.tensor(0.25)
    monkeypatch.setattr(fp8, "triton_ready", lambda device: True)
    x = torch.randn(4, 32) * 50
    want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    quantize = fp8.activation_quantizer(scale, torch.float32)
    assert torch.equal(quantize(x).view(torch.uint8), want)

    from compiler_core.backends.torch.cuda import fp8_quant

    wrong = lambda x, s: torch.zeros(x.shape, dtype=torch.float8_e4m3fn)  # noqa: E731
    monkeypatch.setattr(fp8_quant, "quantize_e4m3", wrong)
    with pytest.warns(UserWarning, match="disagrees"):
        quantize = fp8.activation_quantizer(scale, torch.float32)
    assert torch.equal(quantize(x).view(torch.uint8), want)


@pytest.mark.parametrize("shape", [(1, 4544), (3, 5, 1000), (2, 71), (1025, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_channel_scale_is_torchs_product(device, shape, dtype):
    """``x * scale`` over the last axis, bit for bit torch's product (every element written: the
    output is compared everywhere)."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    scale = (torch.rand(shape[-1], generator=gen) * 2 + 0.1).to(dtype)
    got = channel_scale(x.to(device), scale.to(device)).cpu()
    assert torch.equal(got, x * scale)


def test_channel_scale_refuses_what_it_does_not_compute(device):
    with pytest.raises(ValueError, match="channel_scale needs"):
        channel_scale(torch.ones(2, 8, device=device), torch.ones(8, dtype=torch.float64, device=device))
