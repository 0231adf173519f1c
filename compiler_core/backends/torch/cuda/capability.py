"""Whether the Triton kernels of this package can run on a device."""

from __future__ import annotations

import importlib.util
import os

import torch

#: Hopper-class kernels (bf16 tensor-core dots, float8 conversions) need sm_89 or newer.
MIN_CAPABILITY = (8, 9)


def triton_importable() -> bool:
    """True when the ``triton`` package is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_ready(device: torch.device) -> bool:
    """True where the lowerings should use these kernels: a CUDA device of sm_89+ with Triton.

    ``MODELC_TRITON=0`` turns them off (the previous torch kernels then run), which is how the
    benchmarks and tests compare the two paths on one GPU.
    """
    if os.environ.get("MODELC_TRITON", "1") == "0" or device.type != "cuda" or not triton_importable():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
