"""Where the GPU kernel tests run: on a CUDA GPU when there is one, else under Triton's interpreter.

Without a GPU, ``TRITON_INTERPRET=1`` is set before any kernel module is imported (Triton reads
it when a kernel is defined), so the same kernels run on CPU tensors; without triton installed
the kernel tests skip with that reason.

(:func:`compiler_core.testing.use_triton_interpreter` also patches the interpreter for numpy 2.4.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compiler_core.testing import use_triton_interpreter

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None

if TRITON and not CUDA:
    use_triton_interpreter()


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on here (CUDA, or the CPU under Triton's interpreter)."""
    if not TRITON:
        pytest.skip("triton is not installed: the Triton kernels cannot run (on a GPU or in the interpreter)")
    return torch.device("cuda" if CUDA else "cpu")
