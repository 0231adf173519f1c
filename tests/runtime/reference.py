"""transformers' generate on the same left-padded batches the runtime sees: the reference outputs."""

from __future__ import annotations

import torch


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch, as transformers expects for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(model, prompts: list[list[int]], pad_id: int, **kwargs) -> list[list[int]]:
    """transformers' generate on a left-padded batch; rows of new tokens only."""
    ids, mask = left_padded(prompts, pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **kwargs)
    return out[:, ids.shape[1] :].tolist()


def strip_padding(row: list[int], n: int, fill: set[int]) -> list[int]:
    """The first ``n`` tokens of a transformers output row, asserting the rest is padding."""
    assert set(row[n:]) <= fill, f"transformers continued after the sequence ended: {row}"
    return row[:n]
