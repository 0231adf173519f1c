"""Pure tensor functions: Hugging Face Falcon names and layouts -> IR parameters, and per-rank QKV.

HF fused QKV rows come in kv groups of ``G = heads / kv_heads`` query heads followed by that
group's key and value head (head_dim rows each)::

    new decoder arch (GQA):  [q0 .. q{G-1}, k0, v0 | qG .. q{2G-1}, k1, v1 | ...]
    multi-query (kv = 1):    [q0 .. q{H-1}, k, v]
    MHA (G = 1):             [q0, k0, v0 | q1, k1, v1 | ...]

All three are the same grouped layout, which the IR stores as [Q(all heads) | K(all) | V(all)].
A rank takes its query heads and the KV heads they read, duplicating a KV head when tp_size
exceeds the number of KV heads.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")

_LAYER_NAMES = {
    "self_attention.query_key_value": "attention.qkv",
    "self_attention.dense": "attention.dense",
    "mlp.dense_h_to_4h": "mlp.fc",
    "mlp.dense_4h_to_h": "mlp.proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_layernorm",
    "ln_attn": "ln_attn",
    "ln_mlp": "ln_mlp",
}


def grouped_to_planar(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """HF grouped QKV rows (weight [rows, in] or bias [rows]) -> [Q | K | V], in one copy."""
    g = heads // kv_heads
    rest = tuple(t.shape[1:])
    grouped = t.reshape(kv_heads, g + 2, head_dim, *rest)
    out = t.new_empty(t.shape)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    out[:q_rows].view(kv_heads, g, head_dim, *rest).copy_(grouped[:, :g])
    out[q_rows : q_rows + kv_rows].view(kv_heads, head_dim, *rest).copy_(grouped[:, g])
    out[q_rows + kv_rows :].view(kv_heads, head_dim, *rest).copy_(grouped[:, g + 1])
    return out


def rank_qkv(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s rows of a planar [Q | K | V] tensor, KV heads duplicated if needed."""
    if tp_size == 1:
        return t  # already the whole planar tensor: no copy
    q_per = heads // tp_size
    q = t[: heads * head_dim].reshape(heads, head_dim, *t.shape[1:])
    k = t[heads * head_dim : (heads + kv_heads) * head_dim].reshape(kv_heads, head_dim, *t.shape[1:])
    v = t[(heads + kv_heads) * head_dim :].reshape(kv_heads, head_dim, *t.shape[1:])
    if kv_heads >= tp_size:
        kv_per = kv_heads // tp_size
        kv_index = torch.arange(tp_rank * kv_per, (tp_rank + 1) * kv_per)
    else:
        # The KV head that this rank's first query head belongs to.
        kv_index = torch.tensor([tp_rank * q_per // (heads // kv_heads)])
    parts = [q[tp_rank * q_per : (tp_rank + 1) * q_per], k[kv_index], v[kv_index]]
    return torch.cat([p.reshape(-1, *t.shape[1:]) for p in parts], dim=0).contiguous()


def ir_name(hf_name: str) -> str | None:
    """The IR parameter name of a Falcon HF tensor, or None if it is not a Falcon tensor."""
    name = hf_name.removeprefix("transformer.")
    if name in ("word_embeddings.weight",):
        return "embed.weight"
    if name.startswith("ln_f."):
        return name
    if hf_name == "lm_head.weight":
        return "lm_head.weight"
    match = _LAYER.match(hf_name)
    if not match:
        return None
    layer, rest = match.groups()
    module, _, kind = rest.rpartition(".")
    mapped = _LAYER_NAMES.get(module)
    return None if mapped is None else f"layers.{layer}.{mapped}.{kind}"


def map_falcon_weight(config: dict[str, Any], hf_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """IR tensors for one HF tensor; None when the name is not Falcon's."""
    name = ir_name(hf_name)
    if name is None:
        return None
    if name == "lm_head.weight" and config["tie_word_embeddings"]:
        # transformers ties lm_head to the embedding and ignores a stored copy; so do we.
        return {}
    if ".attention.qkv." in name:
        tensor = grouped_to_planar(tensor, config["num_attention_heads"], config["num_kv_heads"], config["head_dim"])
    out = {name: tensor}
    if name == "embed.weight" and config["tie_word_embeddings"]:
        out["lm_head.weight"] = tensor
    return out
