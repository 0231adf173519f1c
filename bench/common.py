"""Helpers shared by the bench scripts: device sync and timing, copy bandwidth, random Falcon shapes.

The scripts run as ``python bench/bench_x.py``, which puts this directory on ``sys.path``, so they
import these helpers with ``from common import ...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

#: Random Falcon-7B-style shapes (MQA, parallel attention); each script offers a subset as ``--shape``.
SHAPES: dict[str, dict[str, Any]] = {
    # Weights so small that a step's time is the host's per-step work (Python, dispatch, launches).
    "overhead": {"hidden_size": 128, "num_hidden_layers": 8, "num_attention_heads": 2, "vocab_size": 512},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "vocab_size": 8192},
    "small": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "vocab_size": 65024},
    "7b": {"hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71, "vocab_size": 65024},
}


def shapes(*names: str) -> dict[str, dict[str, Any]]:
    """The subset of :data:`SHAPES` named (a script's ``--shape`` choices)."""
    return {name: SHAPES[name] for name in names}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    start = clock()
    out = fn()
    sync(device)
    return clock() - start, out


def best_time(fn, repeat: int, device: str, clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """(fastest seconds, last result) of ``repeat`` timed calls of ``fn``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        seconds, out = timed(fn, device, clock)
        best = min(best, seconds)
    return best, out


def copy_bandwidth(device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    """Memory traffic of a large copy in bytes/s (each byte read once and written once)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds, _ = best_time(lambda: y.copy_(x), 5, device, clock)
    return 2 * x.numel() / seconds


def read_bandwidth(device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes/s of a read-only pass over 1 GiB (a float32 sum): what a GEMV can hope to stream."""
    x = torch.ones(1 << 28, dtype=torch.float32, device=device)  # written, so pages are really backed
    seconds, _ = best_time(x.sum, 5, device, clock)
    return x.numel() * x.element_size() / seconds


def falcon_hf_config(shape: str):
    """transformers' FalconConfig of a random Falcon-7B-style model (MQA, parallel attention) of ``shape``."""
    from transformers import FalconConfig

    return FalconConfig(
        **SHAPES[shape],
        multi_query=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        new_decoder_architecture=False,
        max_position_embeddings=4096,
        initializer_range=0.02,
        bos_token_id=11,
        eos_token_id=11,
    )


def make_hf(shape: str, dtype: torch.dtype, device: str):
    """(HF model, its config): a random-weight Falcon of ``shape`` made on ``device`` in ``dtype``."""
    from transformers import FalconForCausalLM

    config = falcon_hf_config(shape)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            hf = FalconForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    hf = hf.eval()
    hf.config._attn_implementation = "sdpa"
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    return hf, config
