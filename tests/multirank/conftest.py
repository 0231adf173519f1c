"""Fixtures for the multi-rank tests: tiny Falcon checkpoints and their engines at several splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compiler_core.testing import build_engine_dir
from modelc_plugins.falcon.testing import tiny_hf_dirs

#: Prompts of different lengths, so that the ranks also agree on left padding and positions.
PROMPTS = [
    "The river ran slowly past the old mill, and the miller's daughter counted the boats",
    "Cooking rice well takes patience",
    "Light",
]


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """variant -> a 2-layer random-weight Hugging Face Falcon (made once per session)."""
    return tiny_hf_dirs(tmp_path_factory.mktemp("mr-hf"), tokenizer)


@pytest.fixture(scope="session")
def engine(tmp_path_factory, hf_dir) -> Callable[..., Path]:
    """(variant, tp, pp) -> an fp32 torch engine of that split (built once per session)."""
    root = tmp_path_factory.mktemp("mr-engines")

    def get(variant: str, tp: int = 1, pp: int = 1) -> Path:
        return build_engine_dir(hf_dir(variant), root / f"{variant}-tp{tp}pp{pp}", tp, pp)

    return get
