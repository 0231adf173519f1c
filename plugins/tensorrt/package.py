"""Which TensorRT package imports here, and whether this machine has a GPU that runs its engines.

One code path serves both packages that share the TensorRT 10 Python API: NVIDIA's datacenter
``tensorrt`` (tried first: it runs on Hopper) and TensorRT-RTX (``tensorrt_rtx``), which builds
engines ahead of time without any GPU but whose engines run only on compute capability 8.0, 8.6,
8.9 and 12.x GPUs.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

#: Import names, in the order they are tried.
MODULES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = (
    "no TensorRT package imports here: pip install tensorrt-rtx (builds engines without a GPU), "
    "or install NVIDIA's tensorrt from its own index"
)
#: GPUs TensorRT-RTX engines run on (Ampere A100 and RTX, Ada, Blackwell RTX); not Hopper (9.0).
RTX_CAPABILITIES = ((8, 0), (8, 6), (8, 9))
RTX_MAJORS = (12,)
#: The oldest GPU datacenter TensorRT 10 supports (Turing).
DATACENTER_MIN_CAPABILITY = (7, 5)


@functools.cache
def import_tensorrt() -> ModuleType | None:
    """The first TensorRT package of :data:`MODULES` that imports, or None."""
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except (ImportError, OSError):  # OSError: the wheel is there but its CUDA libraries are not
            continue
    return None


def is_rtx(trt: ModuleType) -> bool:
    """True for TensorRT-RTX (CPU-only builds, RTX-class GPUs at run time)."""
    return trt.__name__.split(".")[0] == "tensorrt_rtx"


def describe_package(trt: ModuleType) -> str:
    """``"tensorrt_rtx 1.7.1.116"``: what built an engine (plans only load in the same package)."""
    return f"{trt.__name__.split('.')[0]} {getattr(trt, '__version__', '?')}"


def can_build_reason(trt: ModuleType) -> str | None:
    """None when ``trt`` can build engines here, else why not."""
    if is_rtx(trt) or torch.cuda.is_available():
        return None
    return "datacenter tensorrt needs a CUDA GPU to build engines (pip install tensorrt-rtx builds without one)"


def gpu_reason(trt: ModuleType) -> str | None:
    """None when this machine has a GPU that runs ``trt``'s engines, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    cc = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()} (compute capability {cc[0]}.{cc[1]})"
    if is_rtx(trt):
        if cc in RTX_CAPABILITIES or cc[0] in RTX_MAJORS:
            return None
        return f"TensorRT-RTX engines run on compute capability 8.0, 8.6, 8.9 and 12.x GPUs, not on {gpu}"
    if cc >= DATACENTER_MIN_CAPABILITY:
        return None
    return f"TensorRT 10 needs compute capability 7.5 or newer, not {gpu}"


def make_logger(trt: ModuleType):
    """A ``trt.ILogger`` that keeps error messages in ``.errors`` (for one-line failures) and drops the rest."""

    class ErrorLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))

    return ErrorLogger()
