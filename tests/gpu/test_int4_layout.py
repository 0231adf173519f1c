"""The INT4 GEMM's weight layout (cuda/int4_layout.py): where each code of a row is stored."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the layout module defines Triton functions")

from compiler_core.backends.torch.cuda.int4_layout import words_of
from compiler_core.formats.int4 import pack_int4


def test_each_code_sits_in_the_documented_word_and_nibble():
    """Word 4c + w of a 128-code block holds pair i = 0..3 of lane c's pairs 4w + i: code
    32w + 8i + 2c (+1) in nibble i (i + 4); rows are padded with zero codes to whole blocks."""
    gen = torch.Generator().manual_seed(0)
    out, inp, padded = 3, 200, 256
    codes = torch.randint(-8, 8, (out, inp), generator=gen, dtype=torch.int8)
    words = words_of(pack_int4(codes), padded)
    assert words.dtype == torch.int32 and words.shape == (out, padded // 8)
    full = torch.zeros(out, padded, dtype=torch.int64)
    full[:, :inp] = codes
    for row in range(out):
        for block in range(padded // 128):
            for c in range(4):
                for w in range(4):
                    word = int(words[row, block * 16 + 4 * c + w]) & 0xFFFFFFFF
                    for i in range(4):
                        for half in range(2):
                            k = block * 128 + 32 * w + 8 * i + 2 * c + half
                            nibble = (word >> (4 * (i + 4 * half))) & 0xF
                            assert nibble == int(full[row, k]) & 0xF, (row, k)
