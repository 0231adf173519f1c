"""The AWQ searches (Lin et al., arXiv 2306.00978; mit-han-lab/llm-awq), on plain tensors.

* :func:`search_scale`: one per-input-channel scale ``s`` for the linears that read the same
  activation. Candidates are ``s = mean|x| ** alpha`` for ``alpha`` in {0, 0.05, ..., 0.95}
  (``n_grid`` 20; 1.0 is never tried, as in llm-awq), normalised by ``sqrt(max(s) * min(s))``.
  Each is scored by the MSE between the linears' full-precision outputs ``x @ W.T`` and
  ``(x / s) @ Q(W * s).T`` (``Q`` = group-wise INT4 round-trip); the lowest loss wins.
  ``alpha = 0`` is plain round-to-nearest, so the result is never worse than RTN on the
  calibration tokens.
* :func:`search_clip`: per (output row, group), the clipping range ``amax * (1 - i / 20)`` for
  i = 0..9 with the lowest MSE of that group's partial output ``x_g @ w_g``. A ragged last
  group (see :mod:`modelc_plugins.quant_awq.int4`) is searched like the others, over the channels it has.

Both take the activation as a token sample ``x [tokens, in]``; losses are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelc_plugins.quant_awq.int4 import fake_quantize, group_amax, grouped

#: llm-awq clamps the candidate scales at 1e-4 before normalising them.
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class ScaleSearch:
    """The outcome of :func:`search_scale`: the chosen scales and every candidate's loss."""

    scales: torch.Tensor
    alpha: float
    losses: tuple[float, ...]


def candidate_scales(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x| ** alpha``, clamped at 1e-4 and normalised by ``sqrt(max * min)``."""
    s = x_mean_abs.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def output_mse(x: torch.Tensor, weights: Sequence[torch.Tensor], fake_weights: Sequence[torch.Tensor]) -> float:
    """MSE of ``x @ W.T`` against ``x @ Wq.T`` over all the linears' outputs together (float32 inputs)."""
    err, count = 0.0, 0
    for w, wq in zip(weights, fake_weights, strict=True):
        # x @ W.T - x @ Wq.T == x @ (W - Wq).T, without forming both outputs.
        diff = x @ (w - wq).T
        err += diff.pow(2).sum().item()
        count += diff.numel()
    return err / count


def search_scale(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    group_size: int,
    x_mean_abs: torch.Tensor | None = None,
    n_grid: int = 20,
) -> ScaleSearch:
    """Search the per-input-channel AWQ scale shared by ``weights`` (each ``[out_i, in]``).

    ``x`` is a sample of their common input; ``x_mean_abs`` is mean |x| per channel over every
    calibration token (default: over the sample). Folding the result is the caller's business:
    the producer's output is divided by ``scales`` and each weight multiplied by it.
    """
    x = x.float()
    weights = [w.float() for w in weights]
    if x_mean_abs is None:
        x_mean_abs = x.abs().mean(0)
    losses = []
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean_abs, alpha)
        # (x / s) @ Q(W * s).T is compared with x @ W.T; equivalently x @ (Q(W * s) / s).T.
        fake = [fake_quantize(w * s, group_size).div_(s) for w in weights]
        loss = output_mse(x, weights, fake)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    return ScaleSearch(best[2], best[1], tuple(losses))


def _group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input group, ``x_g.T @ x_g / tokens``: ``[groups, group_size, group_size]``.

    A ragged last group's activations are zero-padded, so its Gram matrix is zero outside the
    channels it has.
    """
    xg = grouped(x.float(), group_size).transpose(0, 1)
    return xg.transpose(1, 2) @ xg / x.shape[0]


def group_output_mse(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per (row, group), the mean over tokens of ``(x_g @ (w_g - wq_g))**2``: ``[out, groups]``.

    Uses the group Gram matrices, ``d.T @ (x_g.T x_g / n) @ d``, so memory stays at the weight's
    size whatever the number of tokens. A ragged last group's padding has zero difference ``d``.
    """
    d = grouped(w.float() - wq, gram.shape[1])
    return torch.einsum("ogi,gij,ogj->og", d, gram, d)


def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    row_chunk: int = 1024,
) -> torch.Tensor:
    """Per-group clipping ranges ``[out, ceil(in / group_size)]`` for ``w [out, in]`` read by ``x [tokens, in]``.

    Tries ``amax * (1 - i / n_grid)`` for ``i < max_shrink * n_grid`` and keeps, per group, the one
    whose partial output ``x_g @ w_g`` changes least after quantization. ``i = 0`` (no clipping)
    is a candidate, so no group ends up worse than without the search.
    """
    gram = _group_gram(x, group_size)
    best_amax = []
    for start in range(0, w.shape[0], row_chunk):
        rows = w[start : start + row_chunk].float()
        org = group_amax(rows, group_size)
        best = org.clone()
        best_err = torch.full_like(org, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            amax = org * (1 - i / n_grid)
            err = group_output_mse(rows, fake_quantize(rows, group_size, amax), gram)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, amax, best)
        best_amax.append(best)
    return torch.cat(best_amax)
