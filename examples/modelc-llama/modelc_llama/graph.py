"""One rank's Llama graph from the core's ops, plus this plugin's ``llama_concat``.

Per layer::

    h = x + o_proj(attention(concat(q_proj(n), k_proj(n), v_proj(n))))   n = rms_norm(x)
    out = h + down_proj(silu(gate_proj(m)) * up_proj(m))                   m = rms_norm(h)

Column-parallel projections (q/k/v, gate/up, lm_head) split their rows, row-parallel ones
(o_proj, down_proj) their columns, followed by an all-reduce: the core's default ``shard_param``
cuts them from their shapes alone. A vocabulary that tp_size does not divide is padded and the
graph says so (``padded_params``), so the core pads that weight and nothing else.
"""

from __future__ import annotations

from typing import Any

from compiler_core.ir import Graph, GraphBuilder
from compiler_core.mapping import Mapping
from modelc_llama.rope import llama3_inv_freq

CONCAT = "llama_concat"


def valid_tp_sizes(config: dict[str, Any]) -> list[int]:
    """The tp sizes that split every head count and the MLP width evenly."""
    counts = (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"])
    return [t for t in range(1, config["num_key_value_heads"] + 1) if all(n % t == 0 for n in counts)]


def check_mapping(config: dict[str, Any], mapping: Mapping) -> None:
    """ValueError naming the valid tp sizes when ``mapping`` cannot split the model."""
    if mapping.tp_size not in valid_tp_sizes(config):
        raise ValueError(
            f"tp_size {mapping.tp_size} must divide num_attention_heads {config['num_attention_heads']}, "
            f"num_key_value_heads {config['num_key_value_heads']} and intermediate_size "
            f"{config['intermediate_size']}; valid tp sizes: {', '.join(map(str, valid_tp_sizes(config)))}"
        )
    if mapping.pp_size > config["num_hidden_layers"]:
        raise ValueError(f"pp_size {mapping.pp_size} exceeds num_hidden_layers {config['num_hidden_layers']}")


def rope_attributes(rope: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The core attention's rotary attributes: linear scaling as the core implements it, llama3 as
    precomputed frequencies (``rope_inv_freq``)."""
    attrs: dict[str, Any] = {"position_embedding": "rope", "rotary_dim": head_dim}
    if rope["rope_type"] == "llama3":
        attrs["rope_inv_freq"] = llama3_inv_freq(rope, head_dim)
        return attrs
    attrs["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] == "linear":
        attrs["rope_scaling"] = {"rope_type": "linear", "factor": rope["factor"]}
    return attrs


def build_graph(config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
    """Rank ``rank``'s graph over decoder ``layers``; the core fills in the runtime attributes."""
    tp = mapping.tp_size
    hidden, hd, eps = config["hidden_size"], config["head_dim"], config["rms_norm_eps"]
    nh, nkv = config["num_attention_heads"] // tp, config["num_key_value_heads"] // tp
    ffn, vocab = config["intermediate_size"] // tp, config["vocab_size"]
    rope = rope_attributes(config["rope"], hd)
    g = GraphBuilder(f"llama.rank{rank}")

    def linear(name: str, x: str, out: int, inp: int, parallel: str) -> str:
        weight = g.param(f"{name}.weight", [out, inp], dtype)
        return g.add("linear", [x], name=name, params={"weight": weight}, parallel=parallel)

    def rms_norm(name: str, x: str) -> str:
        weight = g.param(f"{name}.weight", [hidden], dtype)
        return g.add("rms_norm", [x], name=name, params={"weight": weight}, eps=eps)

    def reduce(name: str, x: str) -> str:
        return g.add("all_reduce", [x], name=f"{name}.all_reduce") if tp > 1 else x

    if mapping.is_first_stage(rank):
        embed = g.param("embed_tokens.weight", [vocab, hidden], dtype)
        x = g.add("embedding", ["input_ids"], name="embed_tokens", params={"weight": embed})
        inputs = ["input_ids"]
    else:
        x = "hidden_states"
        inputs = [x]
    for i in layers:
        p = f"layers.{i}"
        n = rms_norm(f"{p}.input_layernorm", x)
        q = linear(f"{p}.self_attn.q_proj", n, nh * hd, hidden, "column")
        k = linear(f"{p}.self_attn.k_proj", n, nkv * hd, hidden, "column")
        v = linear(f"{p}.self_attn.v_proj", n, nkv * hd, hidden, "column")
        qkv = g.add(CONCAT, [q, k, v], name=f"{p}.self_attn.qkv")
        a = g.add(
            "attention",
            [qkv],
            name=f"{p}.self_attn.core",
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=hd,
            cache_slot=f"layer{i}",
            **rope,
        )
        a = reduce(f"{p}.self_attn", linear(f"{p}.self_attn.o_proj", a, hidden, nh * hd, "row"))
        x = g.add("add", [x, a], name=f"{p}.attn_residual")
        m = rms_norm(f"{p}.post_attention_layernorm", x)
        gate = g.add("silu", [linear(f"{p}.mlp.gate_proj", m, ffn, hidden, "column")], name=f"{p}.mlp.act")
        up = linear(f"{p}.mlp.up_proj", m, ffn, hidden, "column")
        h = g.add("mul", [gate, up], name=f"{p}.mlp.gated")
        h = reduce(f"{p}.mlp", linear(f"{p}.mlp.down_proj", h, hidden, ffn, "row"))
        x = g.add("add", [x, h], name=f"{p}.mlp_residual")
    padded = []
    if mapping.is_last_stage(rank):
        rows = -(-vocab // tp)
        x = linear("lm_head", rms_norm("norm", x), rows, hidden, "column")
        if tp > 1:
            x = g.add("all_gather", [x], name="lm_head.all_gather", axis=-1)
        if rows * tp != vocab:
            padded.append("lm_head.weight")
            x = g.add("narrow", [x], name="lm_head.unpad", axis=-1, start=0, length=vocab)
    return g.build(inputs, [x], attrs={"padded_params": padded})
