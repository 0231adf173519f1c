"""Core ops outside Falcon's graphs, lowered to ONNX, against the torch reference executor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler_core.host import load_registry
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.session import TorchSession
from modelc_plugins.onnx.export import export_rank
from modelc_plugins.onnx.lowering import ExternalData, OnnxLowering, emit_dequantize, emit_quantize, tensor_bytes
from modelc_plugins.onnx.session import OnnxSession
from modelc_plugins.onnx.testing import HEAD_DIM, left_padded, mixed_graph


def run_steps(session, prompts, steps: int = 3) -> list[torch.Tensor]:
    """Prefill, then ``steps`` greedy one-token steps; the logits of every call."""
    ids, mask = left_padded(prompts)
    session.allocate(ids.shape[0], ids.shape[1] + steps)
    outs = [session.forward(ids, positions_from_mask(mask), mask, 0)]
    for _ in range(steps):
        start = mask.shape[1]
        token = outs[-1][:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions_from_mask(mask)[:, -1:]
        outs.append(session.forward(token, positions, mask, start))
    return outs


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv-fp32", "kv-fp8"])
def test_mixed_ops_match_reference(registry, tmp_path, kv_fp8):
    graph, weights = mixed_graph(registry, kv_fp8)
    plan = export_rank(registry, graph, weights, tmp_path, 0)
    for file in plan.files:
        onnx.checker.check_model(str(tmp_path / file), full_check=True)
    prompts = [[3, 7, 11, 2, 9, 4], [5, 1, 8]]
    want = run_steps(TorchSession(registry, graph, weights, "cpu"), prompts)
    got = run_steps(OnnxSession(tmp_path, graph, plan), prompts)
    assert [tuple(w.shape) for w in want] == [tuple(g.shape) for g in got]
    for w, g in zip(want, got, strict=True):
        # Left-padded rows are garbage in both; compare the real tokens (all of them after step 0).
        real = slice(None) if w.shape[1] == 1 else (slice(None), slice(-3, None))
        assert (w[real] - g[real]).abs().max().item() < 2e-4
    if kv_fp8:
        assert plan.cache["s0"].dtype == "float8_e4m3fn"


def test_rope_as_data_matches_reference(registry, tmp_path):
    """Precomputed frequencies (``rope_inv_freq``, as an architecture passes Llama 3's) drive both
    backends, and they really are what rotates: other frequencies give other logits."""
    freqs = [1.0, 0.05]  # rotary_dim 4: two frequencies, neither the default one of any theta here
    graph, weights = mixed_graph(registry, False, {"rotary_dim": HEAD_DIM // 2, "rope_inv_freq": freqs})
    plan = export_rank(registry, graph, weights, tmp_path, 0)
    prompts = [[3, 7, 11, 2, 9, 4], [5, 1, 8]]
    want = run_steps(TorchSession(registry, graph, weights, "cpu"), prompts)
    got = run_steps(OnnxSession(tmp_path, graph, plan), prompts)
    for w, g in zip(want, got, strict=True):
        real = slice(None) if w.shape[1] == 1 else (slice(None), slice(-3, None))
        assert (w[real] - g[real]).abs().max().item() < 2e-4
    other, _ = mixed_graph(registry, False, {"rotary_dim": HEAD_DIM // 2, "rope_inv_freq": [1.0, 0.5]})
    changed = run_steps(TorchSession(registry, other, weights, "cpu"), prompts)
    assert (changed[0][:, -3:] - want[0][:, -3:]).abs().max().item() > 1e-3


def test_cache_is_truncated_to_start(registry, tmp_path):
    """A step at an earlier offset overwrites the cache from there, as the reference does."""
    graph, weights = mixed_graph(registry, False)
    session = OnnxSession(tmp_path, graph, export_rank(registry, graph, weights, tmp_path, 0))
    ids, mask = left_padded([[3, 7, 11, 2]])
    first = session.forward(ids, positions_from_mask(mask), mask, 0)
    session.forward(ids[:, :1], torch.tensor([[4]]), torch.ones(1, 5, dtype=torch.long), 4)
    again = session.forward(ids[:, 3:], torch.tensor([[3]]), mask, 3)
    assert torch.allclose(again[:, -1], first[:, -1], atol=1e-5)


def _ctx_model(tmp_path, build) -> ort.InferenceSession:
    """Build a one-output model with ``build(ctx) -> value`` and load it with onnxruntime."""
    from onnx import helper

    graph, _ = mixed_graph(load_registry(), False)
    with ExternalData(tmp_path / "q.onnx.data") as data:
        ctx = OnnxLowering(graph, {}, data, "q", {})
        out = ctx.emit("Identity", [build(ctx)], outputs=["y"])
    model = helper.make_model(
        helper.make_graph(
            ctx.nodes, "q", [], [helper.make_empty_tensor_value_info(out)], list(ctx.initializers.values())
        ),
        opset_imports=[helper.make_opsetid("", 22)],
    )
    model.ir_version = 10
    onnx.save_model(model, str(tmp_path / "q.onnx"))
    return ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])


def test_int4_blocked_dequantize_helper(tmp_path):
    """AWQ's form: int4 W[K, N] (values in [-8, 7]) with a [K/B, N] scale, block_size B along K."""
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (64, 24), dtype=torch.int8)
    scale = torch.rand(64 // 16, 24) + 0.5

    def build(ctx):
        w = ctx.initializer("w.int4", q, "int4")
        return emit_dequantize(ctx, w, ctx.initializer("w.scale", scale), axis=0, block_size=16)

    (y,) = _ctx_model(tmp_path, build).run(None, {})
    want = q.float() * scale.repeat_interleave(16, dim=0)
    np.testing.assert_array_equal(y, want.numpy())


def test_fp8_quantize_dequantize_helpers(tmp_path):
    """FP8's form: per-tensor QuantizeLinear (saturating) then DequantizeLinear, as torch rounds."""
    x = torch.tensor([[0.013, -1.7, 3.0, 500.0, -1000.0, 0.0]])
    scale = torch.tensor(0.5)

    def build(ctx):
        xv = ctx.initializer("x", x)
        return emit_dequantize(ctx, emit_quantize(ctx, xv, ctx.initializer("s", scale)), "s")

    (y,) = _ctx_model(tmp_path, build).run(None, {})
    want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    np.testing.assert_array_equal(y, want.numpy())


def test_int4_packing_low_nibble_first():
    assert tensor_bytes(torch.tensor([1, -2, 7], dtype=torch.int8), "int4") == bytes([0xE1, 0x07])
    with pytest.raises(ValueError, match="int4"):
        tensor_bytes(torch.tensor([8], dtype=torch.int8), "int4")
