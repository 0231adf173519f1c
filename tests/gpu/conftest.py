"""Where the GPU kernel tests run: on a CUDA GPU when there is one, else under Triton's interpreter.

Without a GPU, ``TRITON_INTERPRET=1`` is set before any kernel module is imported (Triton reads
it when a kernel is defined), so the same kernels run on CPU tensors; without triton installed
the kernel tests skip with that reason.

Triton 3.6's interpreter converts one-element arrays to ints with ``int(array)``, which numpy
2.4 turned into a TypeError (triton-lang/triton#9171, fixed upstream by #9172 after 3.6): any
loop with a run-time bound fails there. :func:`_patch_interpreter_index` applies that fix.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None

if TRITON and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "modelc_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.modelc_index_fix = True
    interpreter._patch_lang_tensor = patched


if TRITON and not CUDA:
    _patch_interpreter_index()


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on here (CUDA, or the CPU under Triton's interpreter)."""
    if not TRITON:
        pytest.skip("triton is not installed: the Triton kernels cannot run (on a GPU or in the interpreter)")
    return torch.device("cuda" if CUDA else "cpu")
