"""The torch backend's fused patterns take the Triton kernels where they are ready, and then compute
what the reference does.

``fp8_linear`` and ``awq_linear`` reach the torch backend as decompositions whose
``matmul(..., dequantize(weight))`` trees the fused patterns ``fp8_gemm`` and ``int4_gemm`` run;
static decode steps run ``attention``'s lowering. On a CPU these run the kernels under Triton's
interpreter with the capability check forced on (and the load-time timing replaced by a fixed
answer, since it needs CUDA graphs), so the hook-in code itself (probes, fallbacks, row dispatch)
is exercised where no GPU is; the kernels are counted, so a pattern that silently kept the old
path fails.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from modelc_plugins.quant_awq.int4 import dequantize_packed, pack_int4, quantize_groups
from modelc_plugins.quant_awq.transform import awq_quantization, transform_graph

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU, test_engines.py checks the hooked-in kernels on the device itself"
)

from compiler_core.backends.torch import kernels  # noqa: E402
from compiler_core.backends.torch.cuda import (  # noqa: E402
    channel_scale,
    decode_attention,
    fp8_gemm,
    int4_gemm,
    residual_add,
    rope_cache,
    tiling,
    timing,
)
from compiler_core.backends.torch.executor import GraphExecutor  # noqa: E402
from compiler_core.backends.torch.fused import channel_scale as channel_scale_pattern  # noqa: E402
from compiler_core.backends.torch.fused import fp8, int4, residual  # noqa: E402
from compiler_core.formats.checkpoint_config import CheckpointConfig, QuantConfig  # noqa: E402
from compiler_core.ir import Graph, GraphBuilder  # noqa: E402
from compiler_core.mapping import Mapping  # noqa: E402
from compiler_core.runtime.context import ForwardContext  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_engines", Path(__file__).with_name("test_engines.py"))
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)

#: The modules whose lowerings check ``triton_ready`` (each imports it by name).
HOOKED = (kernels, fp8, int4, residual, channel_scale_pattern)


def force_triton(monkeypatch, ready: bool) -> None:
    """Tell every hooked-in lowering the Triton kernels are (or are not) ready on any device."""
    for module in HOOKED:
        monkeypatch.setattr(module, "triton_ready", lambda device: ready)


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Calls of each Triton kernel, with the lowerings told the kernels are ready and faster."""
    calls: Counter = Counter()
    wrapped_kernels = (
        (fp8_gemm, "fp8_linear"),
        (decode_attention, "decode_attention"),
        (rope_cache, "rope_cache_write"),
        (residual_add, "residual_add"),
        (int4_gemm, "int4_linear"),
        (int4_gemm, "dequantize_int4"),
        (channel_scale, "channel_scale"),
    )
    for module, name in wrapped_kernels:
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    force_triton(monkeypatch, True)
    monkeypatch.setattr(timing, "first_is_faster", lambda first, second, device: True)
    return calls


def small_engine_run(registry, monkeypatch, qformat: str):
    """(prompt logits, greedy tokens) of the tiny falcon-7b-shaped ``qformat`` engine on CPU, its decode
    steps static (where the attention kernel runs); prompts and steps cut short for the interpreter."""
    monkeypatch.setattr(engines, "PROMPTS", [[5, 17, 99, 3, 250], [44, 2]])
    monkeypatch.setattr(engines, "NEW_TOKENS", 3)
    run = engines.runner(registry, engines.model_of(registry, "7b", qformat), "cpu")
    run.sessions[0].decode_mode = "static"
    return engines.prompt_logits(run), engines.greedy(run)


@pytest.mark.parametrize(("qformat", "kernel"), [("fp8_kv", "fp8_linear"), ("int4_awq", "int4_linear")])
def test_engine_takes_the_triton_kernels_and_matches_the_reference(registry, counted, monkeypatch, qformat, kernel):
    fast_logits, fast_tokens = small_engine_run(registry, monkeypatch, qformat)
    assert counted[kernel] > 0 and counted["decode_attention"] > 0
    assert counted["rope_cache_write"] == counted["decode_attention"]  # every static step's layers
    if qformat == "int4_awq":  # the MLP's second linear's pre-quantization scale: in fc's store
        assert counted["channel_scale"] == 0

    force_triton(monkeypatch, False)
    counted.clear()
    ref_logits, ref_tokens = small_engine_run(registry, monkeypatch, qformat)
    assert not counted  # the reference run really is the path without Triton
    assert engines.relative_error(fast_logits, ref_logits) < 1e-4
    assert fast_tokens == ref_tokens


@pytest.mark.parametrize("qformat", ["float32", "kv_fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_step_takes_the_fused_rotary_cache_write(registry, counted, monkeypatch, qformat, dtype):
    """The tiny falcon-7b-shaped engine's static step (rotary attention on one KV head; a float or
    an FP8 cache) runs rope_cache_write in every layer, and the first layer (whose input both paths
    compute with the same kernels) writes exactly the cache entries the torch path writes."""
    monkeypatch.setattr(engines, "PROMPTS", [[5, 17, 99, 3, 250], [44, 2]])
    # Both runs normalize with torch's LayerNorm, so the first layer's attention input is the same.
    monkeypatch.setattr(kernels, "triton_layer_norm", lambda *args: None)
    model = engines.model_of(registry, "7b", qformat)
    counted.clear()  # (the KV-cache calibration that made the model may have run kernels too)
    fast_logits, fast_cache = engines.static_step(registry, model, "cpu", dtype)
    assert counted["rope_cache_write"] == counted["decode_attention"] == engines.LAYERS
    assert counted["residual_add"] == 2 * engines.LAYERS  # the parallel-attention residuals: prompt, step

    force_triton(monkeypatch, False)
    counted.clear()
    ref_logits, ref_cache = engines.static_step(registry, model, "cpu", dtype)
    assert not counted
    first = next(iter(ref_cache))
    for got, want in zip(fast_cache[first], ref_cache[first], strict=True):
        assert torch.equal(got[:, :, 5].view(torch.uint8), want[:, :, 5].view(torch.uint8))
    # Later layers see the decode attention's output, which sums in another order than SDPA.
    assert engines.relative_error(fast_logits, ref_logits) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(fast_logits.argmax(-1), ref_logits.argmax(-1))


def residual_graph(dtype: str) -> Graph:
    """``out = add(x, add(m, a))``, as Falcon's parallel-attention layer ends at tp1 without biases."""
    g = GraphBuilder("residual")
    y = g.add("add", ["m", "a"], name="attn_plus_mlp")
    out = g.add("add", ["x", y], name="residual")
    return g.build(["x", "m", "a"], [out], attrs={"dtype": dtype})


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_residual_add_pattern_takes_the_triton_kernel(registry, counted, dtype):
    executor = GraphExecutor(registry, residual_graph(dtype), {}, "cpu")
    assert [step.fused for step in executor.steps] == [residual.RESIDUAL_ADD]
    ctx = ForwardContext.for_prompt(torch.ones(2, 3, dtype=torch.long))
    x, m, a = (torch.randn(2, 3, 40).to(getattr(torch, dtype)) * scale for scale in (100, 1, 1))
    (got,) = executor.run({"x": x, "m": m, "a": a}, ctx).values()
    assert counted["residual_add"] == 1
    assert torch.equal(got, x + (m + a))
    # Inputs the kernel does not take (a broadcast branch) run as the two torch adds.
    (got,) = executor.run({"x": x, "m": m, "a": a[:1, :1]}, ctx).values()
    assert counted["residual_add"] == 1
    assert torch.equal(got, x + (m + a[:1, :1]))


def awq_layer(dtype: str, out_features: int, in_features: int, group: int) -> Graph:
    """One column-parallel ``awq_linear`` layer ``fc`` with a pre-quantization scale and a bias."""
    g = GraphBuilder("one_awq_linear")
    w = g.param("fc.weight", [out_features, in_features], dtype)
    b = g.param("fc.bias", [out_features], dtype)
    y = g.add("linear", ["x"], name="fc", params={"weight": w, "bias": b}, parallel="column")
    graph = g.build(["x"], [y], attrs={"dtype": dtype})
    quantization = awq_quantization(QuantConfig(), group, [], ["fc"])
    config = CheckpointConfig("test", dtype, Mapping(), {}, quantization)
    return transform_graph(graph, config)


def test_int4_gemm_pattern_takes_the_triton_kernel_on_a_ragged_layer(registry, counted):
    codes, scales = quantize_groups(torch.randn(40, 96), 64, scale_dtype=torch.bfloat16)  # one ragged group
    weights = {
        "fc.weight": pack_int4(codes),
        "fc.weights_scaling_factor": scales,
        "fc.prequant_scaling_factor": torch.rand(96).bfloat16() + 0.5,
        "fc.bias": torch.randn(40).bfloat16(),
    }
    executor = GraphExecutor(registry, awq_layer("bfloat16", 40, 96, 64), weights, "cpu")
    assert [step.fused for step in executor.steps if step.fused is not None] == [
        channel_scale_pattern.CHANNEL_SCALE,
        int4.INT4_GEMM,
    ]
    probes = tiling.probe_rows("int4", 40, 96)
    assert probes == (1, 16, 32, 64, 128, 129)  # one row, then each row of the tiling table
    assert counted["int4_linear"] == len(probes)  # the load-time probes
    x = torch.randn(3, 5, 96).bfloat16()
    (got,) = executor.run({"x": x}, ForwardContext.for_prompt(torch.ones(3, 5, dtype=torch.long))).values()
    scaled = (x * weights["fc.prequant_scaling_factor"]).double()  # the channel_scale step, in bfloat16
    want = scaled @ dequantize_packed(weights["fc.weight"], scales, 64, torch.float64).T + weights["fc.bias"].double()
    assert got.shape == (3, 5, 40)
    assert engines.relative_error(got, want) < 1e-2
    assert counted["int4_linear"] == len(probes) + 1


def awq_mlp(dtype: str, width: int, hidden: int, group: int, approximate: str) -> Graph:
    """Falcon's MLP, ``proj(gelu(fc(x)))``, in INT4-AWQ with pre-quantization scales."""
    g = GraphBuilder("awq_mlp")
    fc = g.param("fc.weight", [hidden, width], dtype)
    proj = g.param("proj.weight", [width, hidden], dtype)
    h = g.add("linear", ["x"], name="fc", params={"weight": fc}, parallel="column")
    a = g.add("gelu", [h], name="act", approximate=approximate)
    y = g.add("linear", [a], name="proj", params={"weight": proj}, parallel="row")
    graph = g.build(["x"], [y], attrs={"dtype": dtype})
    quantization = awq_quantization(QuantConfig(), group, [], ["fc", "proj"])
    return transform_graph(graph, CheckpointConfig("test", dtype, Mapping(), {}, quantization))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_gelu_and_the_next_linears_scale_run_in_the_int4_gemms_store(registry, counted, approximate):
    """One step for fc + GELU + proj's pre-quantization scale, whose Triton kernel takes both as its
    epilogue (no GELU or channel_scale kernel of its own; fc's own scale has one), and the MLP
    matches float64."""
    width, hidden, group = 96, 160, 32
    gen = torch.Generator().manual_seed(3)
    weights = {}
    for name, shape in (("fc", (hidden, width)), ("proj", (width, hidden))):
        codes, scales = quantize_groups(torch.randn(*shape, generator=gen), group, scale_dtype=torch.bfloat16)
        weights[f"{name}.weight"], weights[f"{name}.weights_scaling_factor"] = pack_int4(codes), scales
    for name, features in (("fc", width), ("proj", hidden)):
        weights[f"{name}.prequant_scaling_factor"] = (torch.rand(features, generator=gen) + 0.5).bfloat16()
    executor = GraphExecutor(registry, awq_mlp("bfloat16", width, hidden, group, approximate), weights, "cpu")
    fused = [step.fused.name for step in executor.steps if step.fused is not None]
    assert fused == ["channel_scale", "int4_gemm+gelu+channel_scale", "int4_gemm"]
    counted.clear()
    x = torch.randn(2, 3, width, generator=gen).bfloat16()
    (got,) = executor.run({"x": x}, ForwardContext.for_prompt(torch.ones(2, 3, dtype=torch.long))).values()
    assert counted["int4_linear"] == 2 and counted["channel_scale"] == 1

    def dense(name):
        w = weights[f"{name}.weight"]
        return dequantize_packed(w, weights[f"{name}.weights_scaling_factor"], group, torch.float64)

    scaled = (x * weights["fc.prequant_scaling_factor"]).double()  # the channel_scale step, in bfloat16
    hidden_act = torch.nn.functional.gelu(scaled @ dense("fc").T, approximate=approximate)
    want = (hidden_act * weights["proj.prequant_scaling_factor"].double()) @ dense("proj").T
    assert engines.relative_error(got, want) < 1e-2


def test_int4_gemm_pattern_keeps_the_dense_kernel_when_the_probe_disagrees(registry, counted, monkeypatch):
    monkeypatch.setattr(int4_gemm, "int4_linear", lambda x, weight, bias=None, **kw: torch.zeros(*x.shape[:-1], 40))
    codes, scales = quantize_groups(torch.randn(40, 96), 64, scale_dtype=torch.float32)
    weights = {"fc.weight": pack_int4(codes), "fc.weights_scaling_factor": scales, "fc.bias": torch.zeros(40)}
    weights["fc.prequant_scaling_factor"] = torch.ones(96)
    with pytest.warns(UserWarning, match="fc: the Triton int4 GEMM disagrees with the reference"):
        executor = GraphExecutor(registry, awq_layer("float32", 40, 96, 64), weights, "cpu")
    x = torch.randn(1, 2, 96)
    (got,) = executor.run({"x": x}, ForwardContext.for_prompt(torch.ones(1, 2, dtype=torch.long))).values()
    torch.testing.assert_close(got, x @ dequantize_packed(pack_int4(codes), scales, 64, torch.float32).T)


@pytest.mark.parametrize("triton_faster", [True, False])
def test_one_row_int4_calls_take_the_faster_kernel(monkeypatch, triton_faster):
    monkeypatch.setattr(timing, "first_is_faster", lambda first, second, device: triton_faster)
    taken = []
    kernel = int4.with_faster_gemv(
        lambda ctx, x: taken.append("triton"), lambda ctx, x: taken.append("tinygemm"), torch.zeros(1, 1, 8)
    )
    kernel(None, torch.zeros(1, 1, 8))
    kernel(None, torch.zeros(2, 1, 8))
    assert taken == (["triton", "triton"] if triton_faster else ["tinygemm", "triton"])


@pytest.mark.parametrize("dequant_faster", [True, False])
def test_int4_prefill_takes_dequantize_and_cublas_from_the_timed_threshold(
    registry, counted, monkeypatch, dequant_faster
):
    """Calls of at least the layer's timed threshold run dequantize_int4 + F.linear, and match the reference."""
    monkeypatch.setattr(timing, "first_is_faster", lambda first, second, device: dequant_faster)
    codes, scales = quantize_groups(torch.randn(40, 96), 64, scale_dtype=torch.bfloat16)  # one ragged group
    weights = {
        "fc.weight": pack_int4(codes),
        "fc.weights_scaling_factor": scales,
        "fc.prequant_scaling_factor": torch.ones(96).bfloat16(),
        "fc.bias": torch.randn(40).bfloat16(),
    }
    executor = GraphExecutor(registry, awq_layer("bfloat16", 40, 96, 64), weights, "cpu")
    assert counted["dequantize_int4"] == 1  # the load-time bit-exactness check
    gemm_calls = counted["int4_linear"]
    rows = int4.PREFILL_PROBE_ROWS[0]
    x = torch.randn(2, rows // 2 + 1, 96).bfloat16()  # just past the threshold, over two sequences
    (got,) = executor.run({"x": x}, ForwardContext.for_prompt(torch.ones(2, rows // 2 + 1, dtype=torch.long))).values()
    want = (
        x.double() @ dequantize_packed(weights["fc.weight"], scales, 64, torch.float64).T + weights["fc.bias"].double()
    )
    assert engines.relative_error(got, want) < 1e-2
    if dequant_faster:
        assert (counted["dequantize_int4"], counted["int4_linear"]) == (2, gemm_calls)
    else:
        assert (counted["dequantize_int4"], counted["int4_linear"]) == (1, gemm_calls + 1)
