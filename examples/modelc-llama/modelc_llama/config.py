"""Hugging Face ``LlamaConfig`` -> the fields this plugin's graphs are built from.

transformers 4 keeps ``rope_theta`` and ``rope_scaling`` at the top level; transformers 5 puts
both in ``rope_parameters``. Either way the result is one ``rope`` entry:

* ``{"rope_type": "default"}`` and ``{"rope_type": "linear", "factor": f}`` go to the core's
  attention as they are (the core implements them);
* ``{"rope_type": "llama3", ...}`` becomes precomputed inverse frequencies (rope as data, see
  :mod:`modelc_llama.rope`), so the core needs no Llama 3 code.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "llama"
#: rope_type values this plugin represents (others would need kernels it does not have).
ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def is_llama(hf: dict[str, Any]) -> bool:
    """True for a Hugging Face config of ``LlamaForCausalLM``."""
    return hf.get("model_type") == "llama" or "LlamaForCausalLM" in (hf.get("architectures") or [])


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    rope: dict[str, Any] = {"rope_type": kind, "rope_theta": theta}
    needed = {"default": (), "linear": ("factor",), "llama3": LLAMA3_FIELDS}[kind]
    for field in needed:
        if not isinstance(params.get(field), int | float):
            raise ValueError(f"rope_scaling: rope_type {kind!r} needs a number in field {field!r}")
        rope[field] = float(params[field])
    return rope


def _positive_int(hf: dict[str, Any], field: str, default: Any = None) -> int:
    value = hf.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"field {field!r} must be a positive integer, got {value!r}")
    return value


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The normalised fields; ValueError naming the field for a config this plugin cannot run."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true is not supported by modelc-llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (Llama's MLP is SwiGLU: silu)")
    hidden = _positive_int(hf, "hidden_size")
    heads = _positive_int(hf, "num_attention_heads")
    kv_heads = _positive_int(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = hf.get("head_dim") or hidden // heads
    return {
        "architecture": ARCHITECTURE,
        "vocab_size": _positive_int(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _positive_int(hf, "intermediate_size"),
        "num_hidden_layers": _positive_int(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope": _rope(hf),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": _positive_int(hf, "max_position_embeddings", 2048),
        # One id or a list (Llama 3 stops on any of three): the core's runtime takes either.
        "eos_token_id": hf.get("eos_token_id"),
        "pad_token_id": hf.get("pad_token_id"),
        "bos_token_id": hf.get("bos_token_id"),
    }
