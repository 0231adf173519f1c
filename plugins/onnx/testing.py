"""Test helpers shared by the onnx and tensorrt plugins' tests: tiny Falcons, checkpoints, engines.

Everything is made on first request under one directory and reused afterwards, so a pytest
session pays for each HF model, checkpoint and engine once, whichever test asks first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compiler_core.host import load_registry
from compiler_core.ir import Graph, GraphBuilder, validate
from compiler_core.mapping import Mapping
from compiler_core.registry import Registry

PROMPTS = ("The weather in the valley was calm and", "Cooking rice")


class TinyFalcons:
    """Tiny random-weight HF Falcons (one per variant) and what modelc makes from them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from modelc_plugins.falcon.tiny import train_tokenizer

            self._tokenizer = train_tokenizer()
        return self._tokenizer

    def prompts(self, texts: Sequence[str] = PROMPTS) -> list[list[int]]:
        """Token ids of ``texts`` (of different lengths, so batches are left-padded)."""
        return [self.tokenizer(t)["input_ids"] for t in texts]

    def hf(self, variant: str, layers: int = 3) -> Path:
        """The HF checkpoint of ``variant`` (float32) with ``layers`` decoder layers."""
        from modelc_plugins.falcon.tiny import make_tiny_falcon

        path = self.root / "hf" / f"{variant}-L{layers}"
        if not path.is_dir():
            make_tiny_falcon(path, variant, tokenizer=self.tokenizer, num_layers=layers)
        return path

    def checkpoint(self, variant: str, dtype: str = "float32", tp: int = 1, pp: int = 1, layers: int = 3) -> Path:
        """A modelc checkpoint of ``variant`` converted to ``dtype`` and split tp x pp."""
        from compiler_core.convert.from_hf import convert

        path = self.root / "ckpt" / f"{variant}-L{layers}-{dtype}-tp{tp}pp{pp}"
        if not path.is_dir():
            mapping = Mapping.create(tp, pp)
            convert(self.hf(variant, layers), path, dtype=dtype, mapping=mapping, show_progress=False)
        return path

    def engine(
        self,
        variant: str,
        backend: str,
        dtype: str = "float32",
        tp: int = 1,
        pp: int = 1,
        layers: int = 3,
        **settings: Any,
    ) -> Path:
        """An engine directory built from :meth:`checkpoint` with ``backend`` and build ``settings``."""
        from compiler_core.build.engine import build_engine

        tag = "".join(f"-{k}{v}" for k, v in sorted(settings.items()))
        path = self.root / "engine" / f"{variant}-L{layers}-{dtype}-tp{tp}pp{pp}-{backend}{tag}"
        if not path.is_dir():
            registry = load_registry()
            chosen = registry.backend(backend, "test")
            ckpt = self.checkpoint(variant, dtype, tp, pp, layers)
            build_engine(ckpt, path, chosen, dict(settings), show_progress=False, registry=registry)
        return path


def local_runner(engine_dir: Path, device: str = "cpu"):
    """Every rank of an engine in this process (tensor-parallel ranks as threads)."""
    from compiler_core.build.engine import engine_mapping, load_rank_session, read_engine_config
    from compiler_core.runtime.runner import LocalRunner

    registry = load_registry()
    config = read_engine_config(engine_dir)
    mapping = engine_mapping(config)
    sessions = [load_rank_session(registry, engine_dir, r, device, config) for r in mapping.ranks()]
    return LocalRunner(sessions, mapping)


def left_padded(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of ``prompts`` left-padded to one length."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def built_engine(checkpoint: Path, out: Path, backend: str) -> Path:
    """``out``, made an engine of ``checkpoint`` for ``backend`` in this process."""
    from compiler_core.build.engine import build_engine

    registry = load_registry()
    build_engine(checkpoint, out, registry.backend(backend, "test"), {}, show_progress=False, registry=registry)
    return out


def prompt_logits(engine_dir: Path, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 prefill logits of ``prompts``, left-padded, and the mask of their real positions."""
    ids, mask = left_padded(prompts)
    return prefill_logits(local_runner(engine_dir), ids, mask), mask.bool()


def prefill_logits(runner, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a whole left-padded batch from an empty cache."""
    from compiler_core.runtime.context import positions_from_mask

    runner.allocate(ids.shape[0], ids.shape[1] + 1)
    with torch.inference_mode():
        return runner.logits(ids, positions_from_mask(mask), mask, 0).float()


def teacher_forced_logits(runner, prompts: Sequence[Sequence[int]], tokens: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits [rows, steps + 1, vocab]: after the prompts, then after feeding
    ``tokens[:, t]`` one decode step at a time through the KV cache, exactly as generation does."""
    from compiler_core.runtime.generation import PromptBatch

    steps = tokens.shape[1]
    batch = PromptBatch(list(prompts), 1, max(len(p) for p in prompts) + steps, 0, torch.device("cpu"))
    runner.allocate(batch.ids.shape[0], batch.mask.shape[1])
    with torch.inference_mode():
        out = [batch.prefill(runner)]
        out += [batch.step(runner, tokens[:, t], t) for t in range(steps)]
    return torch.stack(out, dim=1)


#: Dimensions of :func:`mixed_graph`.
HIDDEN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 32, 50, 4, 2, 8
#: The first attention's default rotary settings: partial, linearly scaled rope.
LINEAR_ROPE = {"rotary_dim": HEAD_DIM // 2, "rope_theta": 500.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}


def mixed_graph(
    registry: Registry, kv_fp8: bool, rope: dict[str, Any] | None = None
) -> tuple[Graph, dict[str, torch.Tensor]]:
    """A graph of core ops outside Falcon's graphs and its random weights, validated against ``registry``'s ops:
    embedding -> rms_norm -> two GQA attentions (rope with ``rope`` settings, default LINEAR_ROPE; ALiBi)
    -> silu/relu/mul/narrow."""
    g = GraphBuilder("ops")
    p = lambda name, shape: g.param(name, shape, "float32")  # noqa: E731
    x = g.add("embedding", ["input_ids"], name="embed", params={"weight": p("embed", [VOCAB, HIDDEN])})
    x = g.add("rms_norm", [x], name="norm", params={"weight": p("norm", [HIDDEN])}, eps=1e-6)
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    for i, position in enumerate(("rope", "alibi")):
        qkv = g.add("linear", [x], name=f"qkv{i}", params={"weight": p(f"qkv{i}", [qkv_rows, HIDDEN])})
        attrs = {"num_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "cache_slot": f"s{i}"}
        params = {}
        if position == "rope":
            attrs.update(position_embedding="rope", **(LINEAR_ROPE if rope is None else rope))
        else:
            attrs.update(
                position_embedding="alibi", alibi_num_heads=8, alibi_head_offset=4, alibi_scale=0.5,
                alibi_compute_dtype="bfloat16", softmax_scale=0.3,
            )  # fmt: skip
        if kv_fp8:
            attrs["kv_cache_dtype"] = "float8_e4m3fn"
            params["kv_cache_scaling_factor"] = g.param(f"kv_scale{i}", [1], "float32")
        a = g.add("attention", [qkv], name=f"attn{i}", params=params, **attrs)
        a = g.add("linear", [a], name=f"out{i}", params={"weight": p(f"out{i}", [HIDDEN, HEADS * HEAD_DIM])})
        x = g.add("add", [x, a], name=f"res{i}")
    h = g.add("silu", [x], name="silu")
    h = g.add("mul", [h, g.add("relu", [x], name="relu")], name="gate")
    h = g.add("bias_add", [h], name="bias", params={"bias": p("bias", [HIDDEN])})
    logits = g.add("linear", [h], name="head", params={"weight": p("head", [VOCAB + 6, HIDDEN])})
    logits = g.add("narrow", [logits], name="unpad", axis=-1, start=0, length=VOCAB)
    graph = g.build(["input_ids"], [logits], attrs={"dtype": "float32", "hidden_size": HIDDEN})
    torch.manual_seed(0)
    weights = {name: torch.randn(param.shape) * 0.3 for name, param in graph.params.items()}
    for name in weights:
        if name.startswith("kv_scale"):
            weights[name] = torch.tensor([0.02])
    return validate(graph, registry.ops), weights
