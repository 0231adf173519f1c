"""Fixtures for the runtime tests: tiny Falcon checkpoints of every variant, built into torch engines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from compiler_core.testing import build_engine_dir
from modelc_plugins.falcon.testing import single_torch_thread, tiny_hf_dirs

#: Prompts of very different lengths, so left padding, positions and masks all matter.
PROMPTS = [
    "The river ran slowly past the old mill, and the miller's daughter counted the boats that drifted "
    "downstream toward the harbour where her father had once worked",
    "Cooking rice well takes patience",
    "Light",
]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads stall when CI runs
    test processes side by side on few cores."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """variant -> a 2-layer random-weight Hugging Face Falcon checkpoint (made once per session)."""
    return tiny_hf_dirs(tmp_path_factory.mktemp("hf"), tokenizer)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory, hf_dir) -> Callable[..., Path]:
    """(variant, tp=1) -> an fp32 torch engine built from ``hf_dir(variant)`` (once per session)."""
    root = tmp_path_factory.mktemp("engines")

    def get(variant: str, tp: int = 1) -> Path:
        return build_engine_dir(hf_dir(variant), root / f"{variant}-tp{tp}", tp)

    return get


@pytest.fixture(scope="session")
def hf_model(hf_dir) -> Callable[[str], torch.nn.Module]:
    """variant -> transformers' FalconForCausalLM with SDPA attention (the reference)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(variant: str):
        if variant not in loaded:
            loaded[variant] = AutoModelForCausalLM.from_pretrained(hf_dir(variant), attn_implementation="sdpa").eval()
        return loaded[variant]

    return get
