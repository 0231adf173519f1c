"""``fp8_linear`` for the onnx backend (and through it TensorRT's ONNX parser).

Per-tensor, symmetric FP8 Q/DQ around a MatMul, the pattern TensorRT turns into FP8 GEMMs::

    x ─Cast(f32)─QuantizeLinear(a_scale, float8e4m3fn, saturate)─DequantizeLinear(a_scale)─Cast─┐
    W^T (float8e4m3fn [in, out]) ─DequantizeLinear(w_scale)─Cast──────────────────────────────MatMul─(+bias)

Both scales are float32 scalars (exact, as in the checkpoint and the torch kernel), so each
DequantizeLinear yields float32 and a Cast brings it to the compute dtype (none for float32
models). QuantizeLinear rounds to nearest even and saturates at ±448, like
:func:`modelc_plugins.quant_fp8.numerics.quantize`. The weight stays FP8 in the external data file.
"""

from __future__ import annotations

from compiler_core.ir import Node


def lower_fp8_linear(node: Node, ctx) -> list[str]:
    """Emit one ``fp8_linear`` node into ``ctx`` (a ``modelc_plugins.onnx.lowering.OnnxLowering``)."""
    from modelc_plugins.onnx.lowering import emit_dequantize, emit_matmul, emit_quantize

    (x,) = ctx.inputs(node)
    w_scale, a_scale = (
        ctx.initializer(f"{node.params[role]}.scalar", ctx.weight(node, role).float().reshape(()))
        for role in ("weights_scaling_factor", "activation_scaling_factor")
    )
    x = emit_dequantize(ctx, emit_quantize(ctx, x, a_scale), a_scale)
    w = emit_dequantize(ctx, ctx.param(node, "weight", transpose=True), w_scale)
    return [emit_matmul(ctx, x, w, ctx.param(node, "bias"), outputs=ctx.outputs_of(node))]
