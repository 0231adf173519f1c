"""Normalise every Hugging Face Falcon config (and the legacy RefinedWeb ones) to one set of fields.

Branching is on config fields only, as transformers' FalconForCausalLM does:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/falcon/configuration_falcon.py
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "falcon"

#: Hugging Face activation names and the IR op (+ attributes) that computes them.
ACTIVATIONS: dict[str, tuple[str, dict[str, str]]] = {
    "gelu": ("gelu", {"approximate": "none"}),
    "gelu_python": ("gelu", {"approximate": "none"}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_fast": ("gelu", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
    "swish": ("silu", {}),
}

_LEGACY_MODEL_TYPES = {"RefinedWeb", "RefinedWebModel"}


def is_falcon(hf: dict[str, Any]) -> bool:
    archs = hf.get("architectures") or []
    return hf.get("model_type") in {"falcon", *_LEGACY_MODEL_TYPES} or any(
        a in {"FalconForCausalLM", "RWForCausalLM"} for a in archs
    )


def _first(hf: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or None
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if rope_type not in (None, "default"):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    elif legacy:
        scaling = dict(legacy)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear)")
        scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
    return theta, scaling


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Return the normalised Falcon fields; raise ValueError naming the offending field.

    Missing fields take transformers' FalconConfig defaults, or for the legacy remote-code
    configs (model_type RefinedWebModel / RefinedWeb) their RWConfig defaults: multi_query and
    parallel_attn false, and RefinedWeb (the 40B code) always the new decoder architecture.
    """
    model_type = hf.get("model_type")
    legacy = model_type in _LEGACY_MODEL_TYPES
    hidden = int(_first(hf, "hidden_size", "n_embed", default=4544))
    heads = int(_first(hf, "num_attention_heads", "n_head", default=71))
    layers = int(_first(hf, "num_hidden_layers", "n_layer", default=32))
    vocab = int(hf.get("vocab_size", 65024))
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError(
            "apply_residual_connection_post_layernorm=true is not supported "
            "(transformers' FalconForCausalLM has no such residual)"
        )
    new_arch = bool(hf.get("new_decoder_architecture", model_type == "RefinedWeb"))
    multi_query = bool(hf.get("multi_query", not legacy))
    parallel_attn = bool(hf.get("parallel_attn", model_type == "RefinedWeb" or not legacy))
    declared_kv = _first(hf, "num_kv_heads", "n_head_kv")
    if new_arch:
        kv = int(declared_kv if declared_kv is not None else heads)
    elif multi_query:
        kv = 1
    else:
        kv = heads
        if declared_kv is not None and int(declared_kv) != heads:
            raise ValueError(
                f"num_kv_heads {declared_kv} with multi_query=false and new_decoder_architecture=false: "
                f"this attention is multi-head, so it needs num_kv_heads = num_attention_heads ({heads})"
            )
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_kv_heads {kv}")
    num_ln = hf.get("num_ln_in_parallel_attn")
    if num_ln is None and new_arch:
        num_ln = 2
    if parallel_attn:
        num_ln = int(num_ln or 1)
        if num_ln not in (1, 2):
            raise ValueError(f"num_ln_in_parallel_attn must be 1 or 2, got {num_ln}")
        if num_ln == 2 and not new_arch:
            raise ValueError(
                "num_ln_in_parallel_attn=2 needs new_decoder_architecture=true "
                "(transformers' Falcon would not run this config)"
            )
    elif new_arch:
        raise ValueError(
            "new_decoder_architecture=true with parallel_attn=false is not a runnable Falcon "
            "(transformers' FalconDecoderLayer has no MLP layer norm for it)"
        )
    else:
        num_ln = 0
    activation = hf.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    theta, scaling = _rope(hf)
    eos = hf.get("eos_token_id", 11)
    return {
        "architecture": ARCHITECTURE,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "head_dim": hidden // heads,
        "ffn_hidden_size": int(hf.get("ffn_hidden_size") or 4 * hidden),
        "layer_norm_epsilon": float(_first(hf, "layer_norm_epsilon", default=1e-5)),
        "bias": bool(hf.get("bias", False)),
        "alibi": bool(hf.get("alibi", False)),
        "new_decoder_architecture": new_arch,
        "parallel_attn": parallel_attn,
        "num_ln_in_parallel_attn": num_ln,
        "activation": activation,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "bos_token_id": hf.get("bos_token_id", 11),
        "eos_token_id": eos,
        "pad_token_id": hf.get("pad_token_id"),
    }
