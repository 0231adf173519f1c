"""The tiling table's launch plans: pipeline depth by operand width, and probe sizes that reach every row."""

from __future__ import annotations

import pytest
import torch

from compiler_core.backends.torch.cuda.tiling import (
    TABLE,
    Config,
    config_for,
    pipeline_stages,
    probe_rows,
    resolve,
)

#: (kernel, weight bits, (out, in) of each size class): falcon-7b's qkv and fc shapes.
KERNELS = [("int4", 4), ("fp8", 8)]
SHAPES = [(4672, 4544), (18176, 4544)]


def rows_of_table():
    for kernel, w_bits in KERNELS:
        for size, rows in TABLE[kernel].items():
            for _, config in rows:
                yield pytest.param(kernel, w_bits, config, id=f"{kernel}-{size}-{config}")


def effective_block_k(kernel: str, config: Config) -> int:
    return config.block_k or 128  # an INT4 row of block_k 0 runs one group (falcon's 128) per K tile


@pytest.mark.parametrize(("kernel", "w_bits", "config"), rows_of_table())
def test_float32_activations_buffer_no_more_than_the_measured_row(kernel, w_bits, config):
    block_k = effective_block_k(kernel, config)

    def buffered(x_bytes: int, stages: int) -> int:
        return stages * (config.block_m * block_k * x_bytes + config.block_n * block_k * w_bits // 8)

    for x_bytes in (2, 4):
        stages = pipeline_stages(config, block_k, x_bytes, w_bits)
        assert 1 <= stages <= config.num_stages
        if x_bytes == 2:
            assert stages == config.num_stages  # 16-bit activations launch the row as measured
        elif stages > 1:
            assert buffered(4, stages) <= buffered(2, config.num_stages)


def test_the_row_that_overflowed_an_h200_in_float32_drops_to_one_stage():
    # 128 x 256 float32 activation tiles: 340 KiB of shared memory at 3 stages on an H200 (227 KiB there).
    config = Config(128, 64, 256, 4, 4, 3, swap_ab=True)
    tiling = resolve(config, 128, 4672, 18, 256, torch.device("cpu"), x_bytes=4, w_bits=4)
    assert tiling.num_stages == 1
    assert resolve(config, 128, 4672, 18, 256, torch.device("cpu"), x_bytes=2, w_bits=4).num_stages == 3


@pytest.mark.parametrize(("kernel", "w_bits"), KERNELS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_probe_rows_reach_every_row_of_the_table(kernel, w_bits, n, k):
    bounds = probe_rows(kernel, n, k)
    assert list(bounds) == sorted(set(bounds))
    every_m = {config_for(kernel, m, n, k) for m in range(1, 2 * bounds[-1])}
    assert {config_for(kernel, m, n, k) for m in bounds} == every_m


@pytest.mark.parametrize(("blocks", "split"), [(6, 3), (7, 2), (16, 1), (40, 1), (1, 16)])
def test_automatic_split_k_is_nearest_to_the_programs_per_multiprocessor(blocks, split):
    """On the CPU (4 multiprocessors assumed) the aim is 16 programs: 6 column blocks split 3 ways
    (18 programs), not 2 (12); 7 blocks split 2 ways; the split stays within 1 and the cap."""
    config = Config(16, 64, 64, 0, 4, 3)
    tiling = resolve(config, 1, blocks * 64, 64, 64, torch.device("cpu"), x_bytes=2, w_bits=4)
    assert (tiling.grid(1, blocks * 64)[0], tiling.split_k) == (blocks, split)


@pytest.mark.parametrize(("programs_per_sm", "blocks", "split"), [(2, 3, 3), (2, 8, 1), (1, 1, 4), (8, 4, 8)])
def test_a_row_sets_its_own_automatic_split_aim(programs_per_sm, blocks, split):
    """The aim is the row's: 2 per multiprocessor on the CPU's 4 is 8 programs, so 3 column blocks
    split 3 ways (9), 8 blocks not at all; 1 per multiprocessor splits one block 4 ways."""
    config = Config(16, 64, 64, 0, 4, 3, programs_per_sm=programs_per_sm)
    tiling = resolve(config, 1, blocks * 64, 64, 64, torch.device("cpu"), x_bytes=2, w_bits=4)
    assert (tiling.grid(1, blocks * 64)[0], tiling.split_k) == (blocks, split)
