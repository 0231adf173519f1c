"""Tile shapes and split-K factors of the GEMM kernels, chosen from the problem size.

Small-M GEMMs (decode) are weight-streaming problems: one tile of rows and a narrow column block
per program leaves most multiprocessors idle for the qkv and dense shapes, so the K loop is split
across programs until there are a few programs per multiprocessor, and the partial sums are added
afterwards. Large-M GEMMs (prefill) are compute-bound and take square tiles without a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Programs per multiprocessor a split-K plan aims for (enough loads in flight to stream memory).
PROGRAMS_PER_SM = 4
#: Multiprocessors assumed under the interpreter (small, so that tests exercise split-K).
INTERPRETER_SMS = 4
#: Smallest INT4 group the INT4 GEMM is used for: at group 16 (one 16-wide K tile) its bfloat16
#: results were wrong on an H200 (cause not found; float32 and groups of 32+ were right), and
#: tinygemm's smallest group is 32 as well.
MIN_GROUP_SIZE = 32


@dataclass(frozen=True)
class Tiling:
    """One launch's tile shape (rows x columns; K tiles are the kernel's own) and split-K factor."""

    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """(column blocks, row blocks, K splits) of an [m, n] output."""
        return (-(-n // self.block_n), -(-m // self.block_m), self.split_k)


def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (:data:`INTERPRETER_SMS` off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(m: int, n: int, k_tiles: int, device: torch.device) -> Tiling:
    """The tiling of an [m, n] output whose K loop has ``k_tiles`` tiles."""
    if m <= 16:
        block_m, block_n, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    blocks = -(-n // block_n) * -(-m // block_m)
    split = 1
    if m <= 64:
        wanted = PROGRAMS_PER_SM * multiprocessors(device)
        split = max(1, min(k_tiles, wanted // blocks, 16))
    return Tiling(block_m, block_n, split, warps, stages)


def k_range(k_tiles: int, split_k: int) -> int:
    """K tiles each split handles (the last split may get fewer)."""
    return -(-k_tiles // split_k)
