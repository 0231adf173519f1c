"""Load-time kernel choice by measurement on the device itself.

Where two correct kernels exist for the same call and which is faster depends on the GPU (a
vendor GEMV against a Triton split-K GEMM at one row, say), the lowering times both once, on a
probe input, and keeps the faster. Times are taken over replays of a CUDA graph, as decode
steps run, so the Python launch cost of either kernel does not decide, and each call is timed
after a write of twice the L2 cache: a decode step streams every weight from memory, while a
layer's weight timed warm sits in the L2 (an int4 falcon-7b MLP weight is 41 MB; the H200's L2
is 60 MB), so a warm timing can rank two kernels otherwise than a decode step runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CALLS_PER_GRAPH = 10
REPLAYS = 3


def graph_seconds(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds per call of ``fn`` on ``device``, each call after an L2 flush, the flush included
    (best of :data:`REPLAYS` replays of a graph of :data:`CALLS_PER_GRAPH` calls)."""
    with torch.cuda.device(device):
        size = 2 * torch.cuda.get_device_properties(device).L2_cache_size
        flush = torch.empty(size, dtype=torch.uint8, device=device)
        return _graph_seconds(fn, flush)


def _graph_seconds(fn: Callable[[], torch.Tensor], flush: torch.Tensor) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            flush.zero_()
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
    return best


def first_is_faster(
    first: Callable[[], torch.Tensor], second: Callable[[], torch.Tensor], device: torch.device
) -> bool:
    """True when ``first`` runs faster than ``second`` on ``device`` (each timed by :func:`graph_seconds`,
    the same flush in both)."""
    return graph_seconds(first, device) < graph_seconds(second, device)
