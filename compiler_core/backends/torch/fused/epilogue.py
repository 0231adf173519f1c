"""GEMM patterns that also take the GELU and the channel scale reading the GEMM's output.

:func:`with_epilogues` turns one GEMM pattern (its ``matmul`` named ``"gemm"``) into it and its
forms under ``gelu``, ``channel_scale`` and ``channel_scale(gelu)``: an MLP's first linear, and in
an INT4-AWQ engine the pre-quantization scale of the linear after it. The GEMM's kernel builder
reads what was taken with :func:`epilogue_of`; its Triton kernels apply it before their one
rounding (:mod:`compiler_core.backends.torch.cuda.epilogue`), its other kernels run the same
torch ops the unfused nodes would (:func:`with_epilogue`), so on a CPU nothing changes.
"""

from __future__ import annotations

import torch

from compiler_core.backends.torch.cuda.epilogue import ACTIVATIONS, NONE, Epilogue
from compiler_core.backends.torch.kernels import Kernel, TorchLowering
from compiler_core.ir import Node
from compiler_core.lowering import FusedPattern, Match, Pattern

#: The name a GEMM pattern gives its ``matmul`` (:meth:`Match.node`).
GEMM = "gemm"


def _fusable_gelu(node: Node) -> bool:
    return node.attrs.get("approximate", "none") in ACTIVATIONS[1:]


def with_epilogues(gemm: FusedPattern) -> tuple[FusedPattern, ...]:
    """``gemm`` and its patterns under a GELU, a channel scale, and a channel scale of a GELU."""
    gelu = Pattern("gelu", (gemm.pattern,), _fusable_gelu, "gelu")
    forms = {
        "gelu": gelu,
        "channel_scale": Pattern("channel_scale", (gemm.pattern,), name="channel_scale"),
        "gelu+channel_scale": Pattern("channel_scale", (gelu,), name="channel_scale"),
    }
    return (
        gemm,
        *(FusedPattern(f"{gemm.name}+{suffix}", gemm.backend, p, gemm.fn, gemm.check) for suffix, p in forms.items()),
    )


def epilogue_of(match: Match, low: TorchLowering) -> Epilogue:
    """The epilogue ``match`` took in (see :func:`with_epilogues`); :data:`NONE` for a bare GEMM."""
    gelu, scale = match.named.get("gelu"), match.named.get("channel_scale")
    if gelu is None and scale is None:
        return NONE
    columns = None
    if scale is not None:
        out_features = int(low.param(match.node("weight"), "quantized").shape[0])
        # channel_scale broadcasts over the last axis: a scalar or one factor per column.
        columns = torch.broadcast_to(low.param(scale, "scale"), (out_features,))
    activation = "" if gelu is None else gelu.attrs.get("approximate", "none")
    return Epilogue(activation, columns)


def with_epilogue(kernel: Kernel, epilogue: Epilogue) -> Kernel:
    """``kernel`` followed by ``epilogue`` as torch ops (the unfused nodes' computation)."""
    if not epilogue:
        return kernel
    return lambda ctx, x: epilogue.apply(kernel(ctx, x))
