"""The lowerings take the Triton kernels where they are ready, and then compute what the reference does.

On a CPU these run the kernels under Triton's interpreter with the capability check forced on
(and the load-time timing replaced by a fixed answer, since it needs CUDA graphs), so the hook-in
code itself (probes, fallbacks, row dispatch) is exercised where no GPU is; the kernels are
counted, so a lowering that silently kept the old path fails.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch
from modelc_plugins.quant_awq.int4 import dequantize_packed, pack_int4, quantize_groups

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU, test_engines.py checks the hooked-in kernels on the device itself"
)

from compiler_core.backends.torch import kernels  # noqa: E402
from compiler_core.backends.torch.cuda import decode_attention, fp8_gemm, int4_gemm, timing  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_engines", Path(__file__).with_name("test_engines.py"))
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Calls of each Triton kernel, with the lowerings told the kernels are ready and faster."""
    from modelc_plugins.quant_fp8 import torch_lowering

    calls: Counter = Counter()
    for module, name in ((fp8_gemm, "fp8_linear"), (decode_attention, "decode_attention"), (int4_gemm, "int4_linear")):
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    for module in (kernels, torch_lowering):
        monkeypatch.setattr(module, "triton_ready", lambda device: True)
    monkeypatch.setattr(timing, "first_is_faster", lambda first, second, device: True)
    return calls


def test_fp8_and_attention_lowerings_take_the_triton_kernels(counted, monkeypatch):
    monkeypatch.setattr(engines, "PROMPTS", [[5, 17, 99, 3, 250], [44, 2]])
    monkeypatch.setattr(engines, "NEW_TOKENS", 3)
    model = engines.model_of("7b", "fp8_kv")
    fast = engines.runner(model, "cpu")
    fast.sessions[0].decode_mode = "static"  # the static decode step is where the attention kernel runs
    fast_logits, fast_tokens = engines.prompt_logits(fast), engines.greedy(fast)
    assert counted["fp8_linear"] > 0 and counted["decode_attention"] > 0

    from modelc_plugins.quant_fp8 import torch_lowering

    for module in (kernels, torch_lowering):
        monkeypatch.setattr(module, "triton_ready", lambda device: False)
    reference = engines.runner(model, "cpu")
    reference.sessions[0].decode_mode = "static"
    assert engines.relative_error(fast_logits, engines.prompt_logits(reference)) < 1e-4
    assert fast_tokens == engines.greedy(reference)


def test_int4_lowering_kernel_matches_reference(counted):
    from modelc_plugins.quant_awq.lowering import triton_int4_kernel

    codes, scales = quantize_groups(torch.randn(40, 96), 64, scale_dtype=torch.bfloat16)  # one ragged group
    packed = pack_int4(codes)
    prequant, bias = torch.rand(96).bfloat16() + 0.5, torch.randn(40).bfloat16()
    kernel = triton_int4_kernel(packed, scales, 64, prequant, bias, "layer")
    assert kernel is not None
    x = torch.randn(3, 5, 96).bfloat16()
    want = (x * prequant).double() @ dequantize_packed(packed, scales, 64, torch.float64).T + bias.double()
    got = kernel(None, x)
    assert got.shape == (3, 5, 40)
    assert engines.relative_error(got, want) < 1e-2
    assert counted["int4_linear"] > 0


@pytest.mark.parametrize("triton_faster", [True, False])
def test_one_row_int4_calls_take_the_faster_kernel(monkeypatch, triton_faster):
    from modelc_plugins.quant_awq.lowering import with_faster_gemv

    monkeypatch.setattr(timing, "first_is_faster", lambda first, second, device: triton_faster)
    taken = []
    kernel = with_faster_gemv(
        lambda ctx, x: taken.append("triton"), lambda ctx, x: taken.append("tinygemm"), torch.zeros(1, 1, 8)
    )
    kernel(None, torch.zeros(1, 1, 8))
    kernel(None, torch.zeros(2, 1, 8))
    assert taken == (["triton", "triton"] if triton_faster else ["tinygemm", "triton"])
