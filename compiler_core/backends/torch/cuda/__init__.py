"""Triton fast paths of the torch backend on CUDA GPUs.

Each module holds one kernel family as a plain function over tensors (``int4_linear``,
``fp8_linear``, ``decode_attention``); the torch backend's fused patterns ``int4_gemm`` and
``fp8_gemm`` (:mod:`compiler_core.backends.torch.fused`) and its ``attention`` lowering pick them
behind :func:`compiler_core.backends.torch.cuda.capability.triton_ready`, so CPU behaviour is
unchanged.
The same kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the tests check them where no GPU is present.
"""
