"""``channel_scale``: an INT4-AWQ layer's input times its pre-quantization scale.

A one-node pattern: on sm_89+ GPUs with Triton the multiply runs as the vectorized kernel
:func:`compiler_core.backends.torch.cuda.channel_scale.channel_scale` (checked once at load to
give torch's product bit for bit); elsewhere, or for inputs it does not take, as torch's
broadcast multiply, which is the op's own lowering.
"""

from __future__ import annotations

import warnings

import torch

from compiler_core.backends.torch.cuda.capability import triton_ready
from compiler_core.backends.torch.kernels import Kernel, TorchLowering
from compiler_core.lowering import FusedPattern, Match, Pattern


def channel_scale_kernel(match: Match, low: TorchLowering) -> Kernel:
    """The kernel of ``channel_scale(x)``: ``fn(ctx, x)``."""
    scale = low.param(match.root, "scale")

    def multiply(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * scale

    if not triton_ready(low.device):
        return multiply
    from compiler_core.backends.torch.cuda import channel_scale as module

    def vectorized(ctx, x: torch.Tensor) -> torch.Tensor:
        return module.channel_scale(x, scale) if module.fusable(x, scale) else multiply(ctx, x)

    gen = torch.Generator(device=low.device).manual_seed(0)
    probe = (torch.randn(3, scale.shape[0], generator=gen, device=low.device) * 3).to(low.compute_dtype)
    try:
        same = torch.equal(vectorized(None, probe), multiply(None, probe))
    except Exception as exc:  # a Triton compile or launch failure on this GPU: keep torch's multiply
        warnings.warn(
            f"node {match.root.name}: the Triton channel scale failed ({type(exc).__name__}: {exc}); not using it",
            stacklevel=3,
        )
        return multiply
    if not same:
        warnings.warn(
            f"node {match.root.name}: the Triton channel scale disagrees with torch's multiply; not using it",
            stacklevel=3,
        )
        return multiply
    return vectorized


CHANNEL_SCALE = FusedPattern("channel_scale", "torch", Pattern("channel_scale"), channel_scale_kernel)
