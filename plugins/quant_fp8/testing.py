"""Helpers for testing the FP8 plugin and plugins built on it: calibration settings, an independent
model of the E4M3 format, and checkpoint logits through every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.loading import checkpoint_runner

VARIANTS = ("rw", "7b", "40b", "180b", "falcon2")

#: Calibration: 16 blocks of 128 tokens of the shipped corpus.
CALIB = {"calib_size": 16, "calib_max_seq_length": 128, "batch_size": 4}


def e4m3_table() -> np.ndarray:
    """Value of every one of the 256 codes, from the bit layout: s eeee mmm, bias 7, S.1111.111 = NaN."""
    codes = np.arange(256, dtype=np.uint8)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exponent = ((codes >> 3) & 0xF).astype(np.int64)
    mantissa = (codes & 0x7).astype(np.float64)
    normal = sign * 2.0 ** (exponent - 7) * (1 + mantissa / 8)
    subnormal = sign * 2.0**-6 * (mantissa / 8)
    values = np.where(exponent == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values


def checkpoint_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """Prefill logits of ``ids`` through every rank of a checkpoint, with a KV cache allocated (so an
    FP8 cache is written and read back)."""
    runner = checkpoint_runner(checkpoint)
    runner.allocate(ids.shape[0], ids.shape[1])
    mask = torch.ones_like(ids)
    return runner.logits(ids, positions_from_mask(mask), mask, 0).float()
