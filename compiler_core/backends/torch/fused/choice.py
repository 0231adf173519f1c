"""A fused pattern's kernel chosen per call size, from kernels timed once at load on the device.

Several correct kernels often exist for one GEMM (a GEMV, a split-K Triton GEMM, a vendor GEMM),
and which is fastest depends on the GPU, the shape and the rows of the call. A pattern times its
candidates at a few row counts when it is lowered and dispatches each call to the choice of the
smallest of those row counts that covers it.
"""

from __future__ import annotations

import torch

from compiler_core.backends.torch.kernels import Kernel


def fastest_kernel(kernels: list[Kernel], probe: torch.Tensor) -> Kernel:
    """The kernel that runs ``probe`` fastest on its device (timed once, as CUDA-graph replays)."""
    from compiler_core.backends.torch.cuda.timing import fastest

    if len(kernels) == 1:
        return kernels[0]
    return kernels[fastest([lambda k=k: k(None, probe) for k in kernels], probe.device)]


def by_rows(default: Kernel, choices: dict[int, Kernel]) -> Kernel:
    """A kernel that runs a call of ``rows`` tokens with ``choices[b]`` for the smallest bound ``b >= rows``,
    and with ``default`` beyond every bound."""
    bounds = sorted(choices)

    def chosen(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        bound = next((b for b in bounds if rows <= b), None)
        return (default if bound is None else choices[bound])(ctx, x)

    return chosen
