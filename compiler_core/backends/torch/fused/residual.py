"""Residual add of a sum: ``add(x, add(a, b))``, the end of Falcon's parallel-attention layer.

At tensor parallelism 1 without biases the layer's ``attn_plus_mlp = add(mlp, attention)`` feeds
only ``residual = add(x, attn_plus_mlp)``. On sm_89+ GPUs with Triton this runs as one kernel
(:func:`compiler_core.backends.torch.cuda.residual_add.residual_add`, rounding as the two adds
do); elsewhere, or for inputs it does not take (broadcasting, mixed dtypes), as the two torch adds.
"""

from __future__ import annotations

import torch

from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.backends.torch.kernels import Kernel, TorchLowering
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern


def residual_add_kernel(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of ``add(x, add(a, b))``: ``fn(ctx, x, a, b)``."""

    def two_adds(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x + (a + b)  # what the two nodes' own lowerings compute, in the graph's order

    if not triton_ready(low.device):
        return two_adds
    from compiler_core.backends.torch.cuda import residual_add as module

    def fused(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if module.fusable(x, a, b):
            return module.residual_add(x, a, b)
        return two_adds(ctx, x, a, b)

    return fused


def _distinct_inputs(match: Match) -> bool:
    # The match's free inputs are deduplicated: add(x, add(x, b)) would hand the kernel two values.
    return len(match.inputs) == 3


def _plain_add(node: Node) -> bool:
    return len(node.inputs) == 2


RESIDUAL_ADD = FusedPattern(
    "residual_add",
    "torch",
    Pattern("add", (None, Pattern("add", where=_plain_add)), where=_plain_add),
    residual_add_kernel,
    check=_distinct_inputs,
)
