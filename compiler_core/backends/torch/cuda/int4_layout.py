"""The INT4 GEMM's weight layout: each row's codes in blocks of 128, as 16 int32 words ordered
for the tensor cores, and the Triton functions that load a K tile of it and rebuild its codes.

A Hopper warp group's tile product takes its left operand (the weight tile, see :mod:`.dot`)
from registers, in a fixed layout: in each k16 step, thread lane ``c = lane % 4`` of a row
holds the code pairs ``p = c`` and ``p = c + 4`` (pair ``p``: codes ``2p, 2p + 1``), so over a
128-code block its 16 pairs are ``p = c + 4r`` for ``r = 0..15``. In the checkpoint's byte
order those pairs are bytes 4 apart, which Triton loads from shared memory one byte at a time.
Here a block is stored as words ``4c + w`` (``c, w`` in ``0..3``), word ``4c + w`` holding the
pairs ``r = 4w + i`` (``i`` in ``0..3``) of lane ``c``, pair ``i``'s low code in nibble ``i``
and its high code in nibble ``i + 4``. A thread's 16 pairs are then 4 consecutive words, one
16-byte load. Within a word, a shift and one mask give a pair at once (:func:`_pair_asm`).

The order is only a storage order: :func:`tile_codes` rebuilds the codes in K order with
reshapes and a permutation, so the result does not depend on the register layout Triton picks.
Compiled for sm_90 at the table's tile shapes, the reordering costs no instruction: the one-row
loop loads a thread's words with two 16-byte shared-memory loads per K tile, against 32 one-byte
loads in the checkpoint's order, and has 192 instructions instead of 264 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compiler_core.formats.int4 import unpack_int4

#: Codes per block of 16 words (and the same two numbers for the Triton functions).
BLOCK_CODES = 128
_BLOCK = tl.constexpr(BLOCK_CODES)
_WORDS = tl.constexpr(BLOCK_CODES // 8)


def words_of(packed: torch.Tensor, in_codes: int) -> torch.Tensor:
    """Checkpoint int4 bytes ``[out, in / 2]`` -> the kernel's int32 words ``[out, in_codes / 8]``, with
    zero codes from ``in`` up to ``in_codes`` (a multiple of :data:`BLOCK_CODES`)."""
    codes = unpack_int4(packed).to(torch.int64) & 0xF
    out, inp = codes.shape
    codes = torch.nn.functional.pad(codes, (0, in_codes - inp))
    # K order within a block: k = 32 w + 8 i + 2 c + half, with pair i = 2 i1 + i0.
    blocks = codes.reshape(out, in_codes // BLOCK_CODES, 4, 2, 2, 4, 2)  # [out, block, w, i1, i0, c, half]
    # Word 4c + w; nibble 4 half + i.
    nibbles = blocks.permute(0, 1, 5, 2, 6, 3, 4).reshape(out, -1, 8)
    words = (nibbles << (4 * torch.arange(8, device=packed.device))).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


@triton.jit
def load_tile_words(w_ptr, rn, n_ok, stride_wn, k0, k_words, BLOCK_K: tl.constexpr):
    """The words of the K tile from code ``k0`` of rows ``rn``: int32 ``[BLOCK_N, BLOCK_K / 8]``
    (zero past ``k_words`` words a row)."""
    j = tl.arange(0, BLOCK_K // 8)
    if BLOCK_K >= _BLOCK:
        idx = k0 // 8 + j  # whole blocks: contiguous words
    else:
        # Part of a block: lane c's words of this part, runs of BLOCK_K / 32.
        RUN: tl.constexpr = BLOCK_K // 32
        part = (k0 % _BLOCK) // BLOCK_K
        idx = (k0 // _BLOCK) * _WORDS + (j // RUN) * 4 + part * RUN + j % RUN
    ok = n_ok[:, None] & (idx[None, :] < k_words)
    return tl.load(w_ptr + rn[:, None] * stride_wn + idx[None, :], mask=ok, other=0)


@triton.jit
def word_scales(s_ptr, rn, n_ok, stride_sn, k0, groups, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The group scale of each word of a K tile (a word's 8 codes lie in 32 consecutive ones, inside
    one group of 32 or more): float32 ``[BLOCK_N, BLOCK_K / 8]``."""
    j = tl.arange(0, BLOCK_K // 8)
    if BLOCK_K >= _BLOCK:
        first = k0 + (j // _WORDS) * _BLOCK + (j % 4) * 32
    else:
        first = k0 + (j % (BLOCK_K // 32)) * 32
    g = first // GROUP
    return tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=n_ok[:, None] & (g[None, :] < groups), other=0.0)


#: The bits of a pair of ``2**e + 8`` in a 16-bit dtype (``2**e``: its smallest power of two with a
#: unit of 1 in the last place, 128 in bfloat16 and 1024 in float16), of a pair of ``-(2**e + 8)``
#: and of a pair of ones: the constants of :func:`_pair_asm`.
BF16_PAIRS = (0x43084308, 0xC308C308, 0x3F803F80)
FP16_PAIRS = (0x64086408, 0xE408E408, 0x3C003C00)


def _pair_asm(dtype: str, constants: tuple[int, int, int], scaled: bool) -> str:
    """PTX turning a word (``$8``) into its four code pairs, each a pair of ``dtype`` halves
    (``$2i``: pair ``i``'s low code, ``$2i+1``: its high one), times the 16-bit scale ``$9`` with
    ``scaled``.

    Pair ``i`` is nibbles ``i`` and ``i + 4``: after a shift by ``4i``, one ``lop3`` keeps bits
    0-3 and 16-19 and XORs in the bits of two ``2**e + 8``, which flips each nibble's sign bit
    (code -> code + 8, in 0..15) under the exponent of ``2**e``; one paired ``fma`` subtracts
    ``2**e + 8`` exactly. The scale multiplies both halves with one rounding, as
    ``dequantize_in_dtype`` rounds ``code * scale`` once.
    """
    bits, minus, one = constants
    lines = ["{ .reg .b32 t, s, one, minus;", f"mov.b32 one, {one:#x}; mov.b32 minus, {minus:#x};"]
    if scaled:
        lines.append("mov.b32 s, {$9, $9};")
    for i in range(4):
        lines.append(f"shr.u32 t, $8, {4 * i};" if i else "mov.b32 t, $8;")
        lines.append(f"lop3.b32 t, t, 0x000F000F, {bits:#x}, 0x6a; fma.rn.{dtype}x2 t, t, one, minus;")
        if scaled:
            lines.append(f"mul.rn.{dtype}x2 t, t, s;")
        lines.append(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t;")
    return " ".join([*lines, "}"])


BF16_CODES = tl.constexpr(_pair_asm("bf16", BF16_PAIRS, scaled=False))
FP16_CODES = tl.constexpr(_pair_asm("f16", FP16_PAIRS, scaled=False))
BF16_SCALED = tl.constexpr(_pair_asm("bf16", BF16_PAIRS, scaled=True))
FP16_SCALED = tl.constexpr(_pair_asm("f16", FP16_PAIRS, scaled=True))
CODES = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r")
SCALED_CODES = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,h")

#: The bits of float32 2**23 + 8 (:data:`MAGIC`). XOR-ed with a code's nibble, they flip the
#: nibble's sign bit (code -> code + 8, in 0..15) and set the exponent of 2**23 above it, so the
#: float is 2**23 + code + 8, and subtracting :data:`MAGIC` leaves the code exactly.
MAGIC_BITS = tl.constexpr(0x4B000008)
MAGIC = tl.constexpr(8388616.0)


@triton.jit
def _nibble(words, n: tl.constexpr):
    """Nibble ``n`` of each word as its float32 code (from the bit pattern, no conversion)."""
    return (((words >> (4 * n)) & 0xF) ^ MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def _word_codes(words, scales, dtype: tl.constexpr, PAIRED: tl.constexpr, SCALED: tl.constexpr):
    """The 8 codes of each word, as 8 tensors of the words' shape in pair order (pair 0's low code,
    its high code, pair 1's, ...): in ``dtype`` pairs built in PTX with ``PAIRED`` (times the words'
    ``scales`` with ``SCALED``), else float32 (unscaled)."""
    if PAIRED:
        if SCALED:
            s = scales.to(dtype)  # exact: the scales are values of the compute dtype
            if dtype == tl.bfloat16:
                out = tl.inline_asm_elementwise(
                    BF16_SCALED, SCALED_CODES, [words, s], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
                )
            else:
                out = tl.inline_asm_elementwise(
                    FP16_SCALED, SCALED_CODES, [words, s], dtype=(tl.float16,) * 8, is_pure=True, pack=1
                )
        elif dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise(BF16_CODES, CODES, [words], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(FP16_CODES, CODES, [words], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        out = (
            _nibble(words, 0),
            _nibble(words, 4),
            _nibble(words, 1),
            _nibble(words, 5),
            _nibble(words, 2),
            _nibble(words, 6),
            _nibble(words, 3),
            _nibble(words, 7),
        )
    return out


@triton.jit
def tile_codes(words, scales, dtype: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr, SCALED: tl.constexpr):
    """A K tile's codes ``[BLOCK_N, BLOCK_K]`` in K order from its words (:func:`load_tile_words`):
    exact codes in ``dtype`` pairs with ``PAIRED`` (times the words' ``scales``, float32
    ``[BLOCK_N, BLOCK_K / 8]``, with ``SCALED``), else float32 codes."""
    rows: tl.constexpr = words.shape[0]
    if BLOCK_K > _BLOCK:
        # One block per row of a taller tile, so that the reordering below stays six-dimensional.
        BLOCKS: tl.constexpr = BLOCK_K // _BLOCK
        words = tl.reshape(words, (rows * BLOCKS, _WORDS))
        if SCALED:
            scales = tl.reshape(scales, (rows * BLOCKS, _WORDS))
        out = tl.reshape(_block_codes(words, scales, dtype, _BLOCK, PAIRED, SCALED), (rows, BLOCK_K))
    else:
        out = _block_codes(words, scales, dtype, BLOCK_K, PAIRED, SCALED)
    return out


@triton.jit
def _block_codes(
    words, scales, dtype: tl.constexpr, CODES_PER_ROW: tl.constexpr, PAIRED: tl.constexpr, SCALED: tl.constexpr
):
    """:func:`tile_codes` of at most one block per row (``CODES_PER_ROW`` <= 128)."""
    c = _word_codes(words, scales, dtype, PAIRED, SCALED)
    # [rows, words, half, i0, i1] with pair i = i0 + 2 i1.
    low_pairs = tl.join(tl.join(c[0], c[1]), tl.join(c[2], c[3]))
    pairs = tl.join(low_pairs, tl.join(tl.join(c[4], c[5]), tl.join(c[6], c[7])))
    rows: tl.constexpr = words.shape[0]
    # Words are (c, w), w < CODES_PER_ROW / 32; the K order is (w, i1, i0, c, half).
    pairs = tl.reshape(pairs, (rows, 4, CODES_PER_ROW // 32, 2, 2, 2))
    return tl.reshape(tl.permute(pairs, (0, 2, 5, 4, 1, 3)), (rows, CODES_PER_ROW))
