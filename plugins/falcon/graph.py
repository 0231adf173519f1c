"""Falcon as an IR graph, one rank at a time.

Block structure by config (transformers' FalconDecoderLayer):
  sequential (parallel_attn=false):  h = x + attn(ln_in(x));  out = h + mlp(ln_post(h))
  parallel, one LN:                  a = ln_in(x);            out = x + attn(a) + mlp(a)
  parallel, two LNs (new arch):      out = x + attn(ln_attn(x)) + mlp(ln_mlp(x))
Row-parallel linears leave their bias out of the GEMM and add it after the all-reduce, so the
bias is counted once; parallel blocks sum attention and MLP partials before one all-reduce.
"""

from __future__ import annotations

import math
from typing import Any

from compiler_core.ir import Graph, GraphBuilder
from compiler_core.mapping import Mapping
from modelc_plugins.falcon.config import ACTIVATIONS


def padded_vocab(vocab: int, tp_size: int) -> int:
    return -(-vocab // tp_size) * tp_size


def heads_per_rank(config: dict[str, Any], tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) held by one rank; KV heads are duplicated when tp_size exceeds them."""
    nh, nkv = config["num_attention_heads"], config["num_kv_heads"]
    return nh // tp_size, max(nkv // tp_size, 1)


def valid_tp_sizes(config: dict[str, Any]) -> list[int]:
    """Every tp_size that splits this model: it divides the query heads and the MLP width, and
    the KV heads either split evenly or are duplicated a whole number of times."""
    nh, nkv, ffn = config["num_attention_heads"], config["num_kv_heads"], config["ffn_hidden_size"]
    return [t for t in range(1, nh + 1) if nh % t == 0 and ffn % t == 0 and (nkv % t == 0 or t % nkv == 0)]


def check_mapping(config: dict[str, Any], mapping: Mapping) -> None:
    """Raise ValueError (head count and the valid tp sizes) when ``mapping`` cannot split the model."""
    nh, nkv, tp = config["num_attention_heads"], config["num_kv_heads"], mapping.tp_size
    ffn = config["ffn_hidden_size"]
    valid = valid_tp_sizes(config)
    if tp not in valid:
        if nh % tp:
            why = f"num_attention_heads {nh} is not a multiple of tp_size {tp}"
        elif ffn % tp:
            why = f"ffn_hidden_size {ffn} is not a multiple of tp_size {tp} (num_attention_heads {nh})"
        else:
            why = f"num_kv_heads {nkv} and tp_size {tp} must divide one another (num_attention_heads {nh})"
        raise ValueError(f"{why}; valid tp sizes: {', '.join(map(str, valid))}")
    if mapping.pp_size > config["num_hidden_layers"]:
        raise ValueError(f"pp_size {mapping.pp_size} exceeds num_hidden_layers {config['num_hidden_layers']}")


def build_graph(config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
    tp, tp_rank = mapping.tp_size, mapping.tp_rank(rank)
    hidden, hd = config["hidden_size"], config["head_dim"]
    nh, nkv = heads_per_rank(config, tp)
    ffn = config["ffn_hidden_size"] // tp
    vocab = config["vocab_size"]
    eps = config["layer_norm_epsilon"]
    has_bias = config["bias"]
    first, last = mapping.is_first_stage(rank), mapping.is_last_stage(rank)
    act_op, act_attrs = ACTIVATIONS[config["activation"]]
    g = GraphBuilder(f"falcon.rank{rank}")

    def layer_norm(prefix: str, x: str) -> str:
        w = g.param(f"{prefix}.weight", [hidden], dtype)
        b = g.param(f"{prefix}.bias", [hidden], dtype)
        return g.add("layer_norm", [x], name=prefix, params={"weight": w, "bias": b}, eps=eps)

    def linear(prefix: str, x: str, out: int, inp: int, parallel: str, bias: bool = True) -> str:
        params = {"weight": g.param(f"{prefix}.weight", [out, inp], dtype)}
        if bias and has_bias:
            params["bias"] = g.param(f"{prefix}.bias", [out], dtype)
        return g.add("linear", [x], name=prefix, params=params, parallel=parallel)

    def bias_add(prefix: str, x: str) -> str:
        if not has_bias:
            return x
        b = g.param(f"{prefix}.bias", [hidden], dtype)
        return g.add("bias_add", [x], name=f"{prefix}.bias_add", params={"bias": b})

    def reduce(prefix: str, x: str) -> str:
        return g.add("all_reduce", [x], name=f"{prefix}.all_reduce") if tp > 1 else x

    def attention(i: int, x: str) -> str:
        p = f"layers.{i}.attention"
        qkv = linear(f"{p}.qkv", x, (nh + 2 * nkv) * hd, hidden, "column")
        attrs: dict[str, Any] = {
            "num_heads": nh,
            "num_kv_heads": nkv,
            "head_dim": hd,
            "cache_slot": f"layer{i}",
        }
        if config["alibi"]:
            attrs.update(
                position_embedding="alibi",
                alibi_num_heads=config["num_attention_heads"],
                alibi_head_offset=tp_rank * nh,
                # Falcon-RW scales the bias with the scores: (QK^T + alibi) / sqrt(head_dim).
                alibi_scale=1.0 / math.sqrt(hd),
                # transformers builds the bias from bfloat16 slopes; matching that keeps parity.
                alibi_compute_dtype="bfloat16",
            )
        else:
            attrs.update(position_embedding="rope", rope_theta=config["rope_theta"], rotary_dim=hd)
            if config["rope_scaling"]:
                attrs["rope_scaling"] = config["rope_scaling"]
        ctx = g.add("attention", [qkv], name=f"{p}.core", **attrs)
        return linear(f"{p}.dense", ctx, hidden, nh * hd, "row", bias=False)

    def mlp(i: int, x: str) -> str:
        p = f"layers.{i}.mlp"
        h = linear(f"{p}.fc", x, ffn, hidden, "column")
        h = g.add(act_op, [h], name=f"{p}.act", **act_attrs)
        return linear(f"{p}.proj", h, hidden, ffn, "row", bias=False)

    if first:
        embed = g.param("embed.weight", [vocab, hidden], dtype)
        x = g.add("embedding", ["input_ids"], name="embed", params={"weight": embed})
        inputs = ["input_ids"]
    else:
        x = "hidden_states"
        inputs = ["hidden_states"]

    for i in layers:
        p = f"layers.{i}"
        if not config["parallel_attn"]:
            a = attention(i, layer_norm(f"{p}.input_layernorm", x))
            a = bias_add(f"{p}.attention.dense", reduce(f"{p}.attention", a))
            x = g.add("add", [x, a], name=f"{p}.attn_residual")
            m = mlp(i, layer_norm(f"{p}.post_layernorm", x))
            m = bias_add(f"{p}.mlp.proj", reduce(f"{p}.mlp", m))
            x = g.add("add", [x, m], name=f"{p}.mlp_residual")
            continue
        if config["num_ln_in_parallel_attn"] == 2:
            a = attention(i, layer_norm(f"{p}.ln_attn", x))
            m = mlp(i, layer_norm(f"{p}.ln_mlp", x))
        else:
            shared = layer_norm(f"{p}.input_layernorm", x)
            a, m = attention(i, shared), mlp(i, shared)
        y = reduce(p, g.add("add", [m, a], name=f"{p}.attn_plus_mlp"))
        y = bias_add(f"{p}.mlp.proj", bias_add(f"{p}.attention.dense", y))
        x = g.add("add", [x, y], name=f"{p}.residual")

    padded_params = []
    if last:
        x = layer_norm("ln_f", x)
        lm_rows = padded_vocab(vocab, tp) // tp
        if lm_rows * tp != vocab:
            padded_params.append("lm_head.weight")
        w = g.param("lm_head.weight", [lm_rows, hidden], dtype)
        x = g.add("linear", [x], name="lm_head", params={"weight": w}, parallel="column")
        if tp > 1:
            x = g.add("all_gather", [x], name="lm_head.all_gather", axis=-1)
            if lm_rows * tp != vocab:
                x = g.add("narrow", [x], name="lm_head.unpad", axis=-1, start=0, length=vocab)
        outputs = [x]
    else:
        outputs = [x]

    return g.build(
        inputs,
        outputs,
        # The core fills in the runtime's attributes (architecture, rank, mapping, layers, stages).
        attrs={"vocab_size": vocab, "hidden_size": hidden, "padded_params": padded_params},
    )
