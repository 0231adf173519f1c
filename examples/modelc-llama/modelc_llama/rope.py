"""Llama 3 rotary frequencies, computed once per graph and handed to the core's attention as data.

The same arithmetic as transformers' ``_compute_llama3_parameters``: wavelengths longer than the
original context divided by ``factor``, shorter than ``original / high_freq_factor`` kept, and a
smooth blend in between. Llama 3 leaves the cos/sin magnitude unscaled, so the frequencies are
all the core's kernels need.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``1 / theta ** (2i / dim)`` in float32, as transformers computes it."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(rope: dict[str, Any], dim: int) -> list[float]:
    """The scaled inverse frequencies ``[dim / 2]`` for a ``rope_type: llama3`` entry."""
    inv_freq = default_inv_freq(rope["rope_theta"], dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled).tolist()
