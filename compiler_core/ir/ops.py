"""Operation signatures.

An :class:`OpSpec` says how many inputs and outputs an op has, which parameter roles it needs
and which attributes must be present. The core registers the ops every decoder needs through
the same ``register_ops`` hook that a plugin uses for its own (a quantized linear, say), so the
validator knows every op without the core naming any plugin.

The quantization primitives (``quantize``, ``dequantize``, then ``matmul``) are what a quantized
op decomposes into, so that every backend can run it. Their ``scale`` parameter is read as:

* per tensor (no ``axis``): one scale (any shape of one element), applied in float32;
* per channel (``axis``): a 1-D scale as long as the data's ``axis``, applied in float32;
* blocked (``axis`` and ``block_size``): the data's rank, ``ceil(D / block_size)`` entries along
  ``axis`` (D the data's size there; the last block holds the rest when ``block_size`` does not
  divide D) and the data's size elsewhere; rounded to the output dtype and applied there.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpSpec:
    """The signature of one op kind."""

    name: str
    doc: str
    num_inputs: tuple[int, int] = (1, 1)
    num_outputs: int = 1
    params: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    optional_attrs: tuple[str, ...] = ()
    #: Sets of ops the core treats alike (e.g. every op in "linear" is a GEMM with a weight
    #: [out, in]: quantizers, sharding rules and scale groups look for that tag; "norm" and
    #: "activation" mark the other producers a derived scale group may start from).
    tags: frozenset[str] = field(default_factory=frozenset)


CORE_OPS: tuple[OpSpec, ...] = (
    OpSpec("embedding", "Token ids [b, s] -> rows of `weight` [vocab, hidden].", params=("weight",)),
    OpSpec(
        "layer_norm",
        "LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias.",
        params=("weight",),
        optional_params=("bias",),
        attrs=("eps",),
        tags=frozenset({"norm"}),
    ),
    OpSpec(
        "rms_norm", "x / sqrt(mean(x^2) + eps) * weight.", params=("weight",), attrs=("eps",), tags=frozenset({"norm"})
    ),
    OpSpec(
        "linear",
        "x @ weight.T (+ bias), weight [out, in]. attr `parallel` is 'column', 'row' or absent.",
        params=("weight",),
        optional_params=("bias",),
        optional_attrs=("parallel",),
        tags=frozenset({"linear"}),
    ),
    OpSpec("bias_add", "x + bias (bias broadcast over the last axis).", params=("bias",)),
    OpSpec(
        "attention",
        "Causal self-attention with a KV cache. Input: fused [Q(num_heads) | K(num_kv_heads) | V(num_kv_heads)]"
        " rows of head_dim each; output [b, s, num_heads*head_dim]. `position_embedding` is 'rope', 'alibi'"
        " or 'none'; `cache_slot` names the layer's KV-cache slot. Rotary settings: see compiler_core.rope"
        " (`rope_inv_freq` passes precomputed frequencies; `rope_scaling` types other than linear are refused).",
        optional_params=("kv_cache_scaling_factor",),
        attrs=("num_heads", "num_kv_heads", "head_dim", "cache_slot", "position_embedding"),
        optional_attrs=(
            "rope_theta",
            "rotary_dim",
            "rope_scaling",
            "rope_inv_freq",
            "alibi_num_heads",
            "alibi_head_offset",
            "alibi_scale",
            "alibi_compute_dtype",
            "softmax_scale",
            "kv_cache_dtype",
        ),
    ),
    OpSpec(
        "gelu",
        "GELU; attr `approximate` is 'none' (erf) or 'tanh'.",
        optional_attrs=("approximate",),
        tags=frozenset({"activation"}),
    ),
    OpSpec("relu", "max(x, 0).", tags=frozenset({"activation"})),
    OpSpec("silu", "x * sigmoid(x).", tags=frozenset({"activation"})),
    OpSpec("add", "Elementwise a + b.", num_inputs=(2, 2)),
    OpSpec("mul", "Elementwise a * b.", num_inputs=(2, 2)),
    OpSpec("all_reduce", "Sum across the tensor-parallel group.", optional_attrs=("group",)),
    OpSpec("all_gather", "Concatenate across the tensor-parallel group along `axis`.", attrs=("axis",)),
    OpSpec("narrow", "Slice `length` elements from `start` along `axis`.", attrs=("axis", "start", "length")),
    # Quantization primitives: what quantized ops decompose into.
    OpSpec(
        "quantize",
        "Codes of `dtype` for x: x / scale, rounded to nearest even and saturated to the type's range"
        " ('float8_e4m3fn': +-448, 'int8': [-128, 127], 'int4': [-8, 7], held one per int8)."
        " Scale granularity from `axis` / `block_size` as the module docstring says.",
        params=("scale",),
        attrs=("dtype",),
        optional_attrs=("axis", "block_size"),
    ),
    OpSpec(
        "dequantize",
        "codes * scale in `out_dtype` (default: the graph's dtype). The codes are the input value, or"
        " with no input the parameter `quantized` (a quantized weight; 'int4' is stored packed two per"
        " int8 byte along the last axis, low nibble first). `dtype` is the codes' type. Scale"
        " granularity from `axis` / `block_size` as the module docstring says.",
        num_inputs=(0, 1),
        params=("scale",),
        optional_params=("quantized",),
        attrs=("dtype",),
        optional_attrs=("axis", "block_size", "out_dtype"),
    ),
    OpSpec(
        "matmul",
        "x @ weight.T (+ bias): `linear` with its weight [out, in] an input value (a dequantized weight).",
        num_inputs=(2, 2),
        optional_params=("bias",),
    ),
    OpSpec("channel_scale", "x * scale, scale [last axis] broadcast (as bias_add adds a bias).", params=("scale",)),
)
