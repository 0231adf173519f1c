"""Helpers for the Falcon plugin's tests and others built on it: the splits and greedy steps every
variant is checked under, one torch thread, cached tiny HF Falcon checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Greedy tokens compared with transformers' generate for every variant and split.
STEPS = 32
#: The tp/pp splits every variant is checked under: (tp_size, pp_size).
SPLITS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block; the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_hf_dirs(root: Path, tokenizer: Any, num_layers: int = 2) -> Callable[[str], Path]:
    """variant -> a ``num_layers``-layer random-weight HF Falcon checkpoint under ``root`` (made once)."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_tiny_falcon(root / variant, variant, num_layers=num_layers, tokenizer=tokenizer)
        return made[variant]

    return get


def shared_model_cache(tmp_path_factory: Any) -> Path:
    """A model cache shared by every test of one pytest session (never the user's own cache), so that
    the trained tiny Falcon is trained once per session, by whichever test asks first."""
    return Path(tmp_path_factory.getbasetemp()) / "modelc-cache"
