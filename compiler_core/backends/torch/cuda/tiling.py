"""Tile shapes and split-K factors of the GEMM kernels, read from one table by kernel, size and M.

Small-M GEMMs (decode) are weight-streaming problems: one tile of rows and a narrow column block
per program leaves most multiprocessors idle for the qkv and dense shapes, so the K loop is split
across programs until there are a few programs per multiprocessor, and the last split of each
output tile adds the partial sums (:mod:`.splitk`). Large-M GEMMs (prefill) are compute-bound and
take square tiles without a split.

:data:`TABLE` is the only place launch parameters are kept: ``TABLE[kernel][size class]`` is a
list of ``(largest M, Config)`` rows, the first row whose M bound covers the call wins. The size
class (:func:`size_class`) separates the 4.5k x 4.5k attention linears from the 4.5k x 18k MLP
ones, whose best splits differ; the values come from an H200 sweep (``bench/gpu_tune.py``, which
prints a table in this form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Programs per multiprocessor an automatic split-K plan aims for unless its row says otherwise
#: (enough loads in flight to stream memory).
PROGRAMS_PER_SM = 4
#: Multiprocessors assumed under the interpreter (small, so that tests exercise split-K).
INTERPRETER_SMS = 4
#: Smallest INT4 group the INT4 GEMM is used for: at group 16 (one 16-wide K tile) its bfloat16
#: results were wrong on an H200 (cause not found; float32 and groups of 32+ were right), and
#: tinygemm's smallest group is 32 as well.
MIN_GROUP_SIZE = 32
#: Split-K cap of the automatic plan (more splits add float32 partial sums to write and add).
MAX_AUTO_SPLIT = 16
#: Weights of at least this many elements (out x in) are "large" (falcon-7b's fc/proj: 82.6M;
#: qkv/dense: 21.2M).
LARGE_WEIGHT = 1 << 26
#: Largest M bound in the table (every call is covered).
ANY_M = 1 << 62


@dataclass(frozen=True)
class Config:
    """One row of :data:`TABLE`: launch parameters of a GEMM kernel.

    ``block_k``: the K tile. For the FP8 GEMM any power of two >= 16. For the INT4 GEMM, 0 means
    one group per K tile with the partial sum rescaled per group in float32 (the original form);
    a power of two >= 16 means the codes are scaled into the compute dtype in registers, so one
    tile may span several groups or part of one. ``split_k``: K splits, 0 = automatic
    (``programs_per_sm`` programs per multiprocessor, capped at :data:`MAX_AUTO_SPLIT`).
    ``swap_ab``: the weight tile as the tile product's left operand (see :mod:`.dot`).
    ``programs_per_sm``: the automatic split's aim. It is a row's own because the best one
    depends on how many programs of that tile a multiprocessor holds at once: the 64-row INT4
    tile (3 per multiprocessor on an H200) was fastest at about 2 on all four falcon-7b linears,
    whose column blocks differ 4x, while the 16-row rows were tuned at 4.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False
    programs_per_sm: int = PROGRAMS_PER_SM


@dataclass(frozen=True)
class Tiling:
    """One launch's tile shape, K tile and split-K: ``split_k`` splits of ``tiles_per_split`` K tiles
    each (the last may get fewer; none gets none)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    tiles_per_split: int
    num_warps: int
    num_stages: int

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """(column blocks, row blocks, K splits) of an [m, n] output."""
        return (-(-n // self.block_n), -(-m // self.block_m), self.split_k)

    def tiles(self, m: int, n: int) -> int:
        """Output tiles of an [m, n] output (each split-K counter guards one)."""
        blocks_n, blocks_m, _ = self.grid(m, n)
        return blocks_n * blocks_m

    def partials(self, m: int, n: int, y: torch.Tensor) -> torch.Tensor:
        """The splits' float32 partial sums ``[split_k, m, n]`` (see :mod:`.splitk`); ``y`` itself,
        unused, without a split."""
        return y if self.split_k == 1 else torch.empty((self.split_k, m, n), dtype=torch.float32, device=y.device)


# Measured on one NVIDIA H200 by bench/gpu_tune.py (falcon-7b's linears; the searches and their
# tables are in docs/PERFORMANCE.md): "small" from qkv/dense, "large" from fc/proj.
# - INT4 decode rows (M <= 128): the session-10 sweep, after the codes were built in pairs. The
#   64-row rows are from session 11, in the word layout (.int4_layout): the one-group K tile, split
#   to about 2 programs per multiprocessor (the best split of each linear: fc 1, the others 4).
#   So is the small class's 128-row row (32-row tiles: qkv 27.1 -> 25.7 us, dense 26.9 -> 25.4).
#   A session-11 re-sweep of 1 to 32 rows in the word layout kept the other rows (within 1 us).
# - FP8 decode rows: the session-9 sweeps (both sweeps searched the operand order, swap_ab).
# - The FP8 rows from 17 to 64 rows and the rows above 128 (prefill) are older.
# INT4 prefill above 128 rows mostly takes the dequantize + cuBLAS path instead (fused/int4.py), and
# FP8 above 16 rows cuBLASLt (fused/fp8.py).
TABLE: dict[str, dict[str, tuple[tuple[int, Config], ...]]] = {
    "int4": {
        "small": (
            (16, Config(16, 64, 0, 8, 4, 3, swap_ab=True)),
            (32, Config(32, 64, 0, 8, 4, 3, swap_ab=True)),
            (64, Config(64, 64, 0, 0, 4, 3, swap_ab=True, programs_per_sm=2)),
            (128, Config(32, 64, 0, 2, 4, 3, swap_ab=True)),
            (ANY_M, Config(128, 128, 0, 1, 8, 3)),
        ),
        "large": (
            (16, Config(16, 64, 0, 0, 4, 3, swap_ab=True)),
            (32, Config(32, 64, 0, 0, 4, 3, swap_ab=True)),
            (64, Config(64, 64, 0, 0, 4, 3, swap_ab=True, programs_per_sm=2)),
            (128, Config(128, 64, 0, 0, 4, 3, swap_ab=True)),
            (ANY_M, Config(128, 128, 0, 1, 8, 3)),
        ),
    },
    "fp8": {
        "small": (
            (1, Config(16, 128, 256, 8, 4, 3, swap_ab=True)),
            (4, Config(16, 128, 64, 16, 8, 3, swap_ab=True)),
            (16, Config(16, 128, 128, 8, 8, 3)),
            (32, Config(16, 128, 64, 8, 4, 3)),
            (64, Config(64, 128, 64, 8, 8, 5)),
            (ANY_M, Config(128, 128, 128, 1, 8, 3)),
        ),
        "large": (
            (1, Config(16, 64, 256, 4, 4, 3, swap_ab=True)),
            (4, Config(16, 128, 64, 0, 8, 3, swap_ab=True)),
            (16, Config(16, 64, 128, 8, 4, 3, swap_ab=True)),
            (32, Config(16, 128, 64, 16, 4, 3)),
            (64, Config(64, 128, 64, 4, 8, 5)),
            (ANY_M, Config(128, 128, 128, 1, 8, 3)),
        ),
    },
}


def size_class(n: int, k: int) -> str:
    """``"large"`` for weights of at least :data:`LARGE_WEIGHT` elements, else ``"small"``."""
    return "large" if n * k >= LARGE_WEIGHT else "small"


def config_for(kernel: str, m: int, n: int, k: int) -> Config:
    """The :data:`TABLE` row of ``kernel`` (``"int4"`` / ``"fp8"``) for an [m, k] x [k, n] GEMM."""
    return next(config for max_m, config in TABLE[kernel][size_class(n, k)] if m <= max_m)


def probe_rows(kernel: str, n: int, k: int, max_rows: int = ANY_M) -> tuple[int, ...]:
    """The M of a lowering's load-time probes of ``kernel`` for an [*, k] x [k, n] GEMM, up to
    ``max_rows``: one row (the FP8 GEMM's one-row form compiles on its own) and one M per
    :data:`TABLE` row (each row's bound, the last row's as one past the row before it). Calls of
    these sizes compile every launch the table can pick, at load rather than inside a graph capture."""
    bounds = [max_m for max_m, _ in TABLE[kernel][size_class(n, k)]]
    last = bounds[-2] + 1 if len(bounds) > 1 else 1
    return tuple(sorted({1, *(m for m in (*bounds[:-1], last) if m <= max_rows)}))


def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count (:data:`INTERPRETER_SMS` off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Bytes per activation element the table's rows were measured with (bfloat16).
TUNED_ACTIVATION_BYTES = 2


def pipeline_stages(config: Config, block_k: int, x_bytes: int, w_bits: int) -> int:
    """``config``'s pipeline depth for activations of ``x_bytes`` per element and weights of ``w_bits``.

    Each stage buffers one activation and one weight tile in shared memory. With wider activations
    than the table was measured with (float32 engines), the depth drops so that the buffers take at
    most what the measured row's did: a 128-row, 256-deep float32 tile at the row's 3 stages needed
    340 KiB on an H200, which has 227.
    """

    def stage_bytes(activation_bytes: int) -> int:
        return config.block_m * block_k * activation_bytes + config.block_n * block_k * w_bits // 8

    measured = config.num_stages * stage_bytes(TUNED_ACTIVATION_BYTES)
    return max(1, min(config.num_stages, measured // stage_bytes(x_bytes)))


def resolve(
    config: Config, m: int, n: int, k_tiles: int, block_k: int, device: torch.device, *, x_bytes: int, w_bits: int
) -> Tiling:
    """The launch of ``config`` for an [m, n] output whose K loop has ``k_tiles`` tiles of ``block_k``,
    with activations of ``x_bytes`` per element and weights of ``w_bits`` (see :func:`pipeline_stages`).

    An automatic split-K (0) takes the split nearest to ``config.programs_per_sm`` programs per
    multiprocessor (rounding down instead left falcon-7b's fc at 64 rows, 284 column blocks on an
    H200's 132 multiprocessors, unsplit: 56.9 us, against 47.7 us split in two, at 4 programs per
    multiprocessor); any split is capped at ``k_tiles`` (one tile per split at least).
    """
    split = config.split_k
    if split == 0:
        blocks = -(-n // config.block_n) * -(-m // config.block_m)
        split = max(1, min(MAX_AUTO_SPLIT, round(config.programs_per_sm * multiprocessors(device) / blocks)))
    per_split = -(-k_tiles // max(1, min(split, k_tiles)))
    split = -(-k_tiles // per_split)  # every split then holds at least one tile and writes its partials
    stages = pipeline_stages(config, block_k, x_bytes, w_bits)
    return Tiling(config.block_m, config.block_n, block_k, split, per_split, config.num_warps, stages)
