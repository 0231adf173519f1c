"""Split-K without a second kernel: the last split of each output tile adds the partial sums.

A decode GEMM splits its K loop across programs (see :mod:`.tiling`). Adding the splits' float32
partial sums afterwards with torch took two more launches per linear (the sum and the cast),
each of which cost as much as a small GEMM's whole weight read at one row. Here every split
stores its partial tile and counts itself in on the tile's arrival counter; the program that
arrives last reads the tile's partials back in split order (so the result does not depend on
which program came last), adds them in float32, rounds once to the output dtype and stores the
tile, then resets the counter to zero for the next launch.

The tile's last store also applies the GEMM's epilogue (:func:`finish`: a GELU and / or a column
scale, see :mod:`.epilogue`), after the sum and before the one rounding.

The counters live in a :class:`TileLocks` the caller keeps (one per layer, made at load), so a
launch inside a CUDA graph finds them zero without a memset of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.backends.torch.cuda.rounding import cast

#: Output tiles a :class:`TileLocks` holds counters for at first (16 KiB; falcon-7b's widest decode
#: GEMM has 18176 / 64 = 284 tiles per row block). A larger call grows them, which the load-time
#: probes of the lowerings do before any graph capture.
INITIAL_TILES = 4096


class TileLocks:
    """The arrival counters of one GEMM's split-K output tiles on one device (all zero between launches)."""

    def __init__(self, device: torch.device, tiles: int = INITIAL_TILES) -> None:
        self.counters = torch.zeros(tiles, dtype=torch.int32, device=device)

    def for_tiles(self, tiles: int) -> torch.Tensor:
        """Zeroed counters for ``tiles`` output tiles."""
        if self.counters.numel() < tiles:
            self.counters = torch.zeros(
                max(tiles, 2 * self.counters.numel()), dtype=torch.int32, device=self.counters.device
            )
        return self.counters


@triton.jit
def store_tile(
    acc,
    y_ptr,
    part_ptr,
    lock_ptr,
    rm,
    rn,
    M,
    N,
    stride_ym,
    pid_k,
    n_splits,
    SPLIT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    scale_ptr,
    ACTIVATION: tl.constexpr,
    COLUMN_SCALE: tl.constexpr,
):
    """Store the float32 tile ``acc`` (rows ``rm``, columns ``rn``) of a GEMM's output, after its
    epilogue (:func:`finish` with ``scale_ptr``, ``ACTIVATION``, ``COLUMN_SCALE``), rounded
    to nearest even in its dtype (under the interpreter too: ``INTERPRETED``, see :func:`.rounding.cast`).

    With ``SPLIT`` (``n_splits > 1``) ``acc`` is split ``pid_k``'s partial sum: it goes to
    ``part_ptr [n_splits, M, N]`` (float32), and the last split of the tile to arrive on
    ``lock_ptr`` (this tile's counter) adds all the tile's partials and stores the result.
    """
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if not SPLIT:
        acc = finish(acc, rn, N, scale_ptr, ACTIVATION, COLUMN_SCALE)
        tl.store(out, cast(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    else:
        part = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        # Every thread's partial is stored before the tile counts this split in (release), and
        # the last split reads the others' only after its count (acquire).
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            total = tl.zeros_like(acc)
            for s in range(0, n_splits):
                total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            total = finish(total, rn, N, scale_ptr, ACTIVATION, COLUMN_SCALE)
            tl.store(out, cast(total, y_ptr.dtype.element_ty, INTERPRETED), mask=mask)
            tl.atomic_xchg(lock_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def finish(acc, rn, N, scale_ptr, ACTIVATION: tl.constexpr, COLUMN_SCALE: tl.constexpr):
    """An :class:`.epilogue.Epilogue` on the float32 tile ``acc`` (columns ``rn`` of ``N``), in float32."""
    if ACTIVATION == "none":
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "tanh":
        # tanh(u) = 2 sigmoid(2u) - 1: Triton has the sigmoid (an exp2) on every target.
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * inner)
    if COLUMN_SCALE:
        acc = acc * tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc
