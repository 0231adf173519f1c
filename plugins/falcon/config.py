"""Normalise every Hugging Face Falcon config (and the legacy RefinedWeb ones) to one set of fields.

Branching is on config fields only, as transformers' FalconForCausalLM does:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/falcon/configuration_falcon.py
"""

from __future__ import annotations

from typing import Any

from compiler_core.formats.fields import (
    bool_field,
    dict_field,
    float_field,
    int_field,
    str_field,
    token_id_field,
    token_ids_field,
)

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
    archs = hf.get("architectures")
    model_type = hf.get("model_type")
    return (isinstance(model_type, str) and model_type in {"falcon", *_LEGACY_MODEL_TYPES}) or (
        isinstance(archs, list) and any(a in ("FalconForCausalLM", "RWForCausalLM") for a in archs)
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict_field(hf, "rope_parameters") or {}
    legacy = dict_field(hf, "rope_scaling") or None
    theta = float_field(params, "rope_theta", default=None, positive=True) or float_field(
        hf, "rope_theta", default=10000.0, positive=True
    )
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
        scaling = {"rope_type": "linear", "factor": float_field(scaling, "factor", positive=True)}
    return theta, scaling


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Return the normalised Falcon fields; raise ValueError naming the offending field.

    ``vocab_size`` is required. Other missing fields take transformers' FalconConfig defaults, or
    for the legacy remote-code configs (model_type RefinedWebModel / RefinedWeb) their RWConfig
    defaults: multi_query and parallel_attn false, and RefinedWeb (the 40B code) always the new
    decoder architecture. Fields of the wrong JSON type or range are refused, never coerced.
    """
    model_type = hf.get("model_type")
    legacy = isinstance(model_type, str) and model_type in _LEGACY_MODEL_TYPES
    hidden = int_field(hf, "hidden_size", "n_embed", default=4544, minimum=1)
    heads = int_field(hf, "num_attention_heads", "n_head", default=71, minimum=1)
    layers = int_field(hf, "num_hidden_layers", "n_layer", default=32, minimum=1)
    # Required although FalconConfig has a default: 65024 is right only for Falcon's own tokenizer,
    # and every config.json that transformers saves names it.
    vocab = int_field(hf, "vocab_size", minimum=1)
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if bool_field(hf, "apply_residual_connection_post_layernorm", default=False):
        raise ValueError(
            "apply_residual_connection_post_layernorm=true is not supported "
            "(transformers' FalconForCausalLM has no such residual)"
        )
    new_arch = bool_field(hf, "new_decoder_architecture", default=model_type == "RefinedWeb")
    multi_query = bool_field(hf, "multi_query", default=not legacy)
    parallel_attn = bool_field(hf, "parallel_attn", default=model_type == "RefinedWeb" or not legacy)
    declared_kv = int_field(hf, "num_kv_heads", "n_head_kv", default=None, minimum=1)
    if new_arch:
        kv = declared_kv if declared_kv is not None else heads
    elif multi_query:
        kv = 1
    else:
        kv = heads
        if declared_kv is not None and declared_kv != heads:
            raise ValueError(
                f"num_kv_heads {declared_kv} with multi_query=false and new_decoder_architecture=false: "
                f"this attention is multi-head, so it needs num_kv_heads = num_attention_heads ({heads})"
            )
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_kv_heads {kv}")
    num_ln = int_field(hf, "num_ln_in_parallel_attn", default=None)
    if num_ln is None and new_arch:
        num_ln = 2
    if parallel_attn:
        num_ln = num_ln or 1
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
    activation = str_field(hf, "activation", default="gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    theta, scaling = _rope(hf)
    return {
        "architecture": ARCHITECTURE,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "head_dim": hidden // heads,
        "ffn_hidden_size": int_field(hf, "ffn_hidden_size", default=4 * hidden, minimum=1),
        "layer_norm_epsilon": float_field(hf, "layer_norm_epsilon", default=1e-5, positive=True),
        "bias": bool_field(hf, "bias", default=False),
        "alibi": bool_field(hf, "alibi", default=False),
        "new_decoder_architecture": new_arch,
        "parallel_attn": parallel_attn,
        "num_ln_in_parallel_attn": num_ln,
        "activation": activation,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int_field(hf, "max_position_embeddings", default=2048, minimum=1),
        "tie_word_embeddings": bool_field(hf, "tie_word_embeddings", default=True),
        "bos_token_id": token_id_field(hf, "bos_token_id", default=11),
        "eos_token_id": token_ids_field(hf, "eos_token_id", default=11),
        "pad_token_id": token_id_field(hf, "pad_token_id"),
    }
