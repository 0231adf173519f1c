"""Fixtures for the serving tests: tiny random-weight Falcon engines with small build limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compiler_core.testing import build_engine_dir
from modelc_plugins.falcon.testing import single_torch_thread, tiny_hf_dirs

#: Build limits small enough that tests reach them: prompts over 40 tokens or past 64 in all are refused.
LIMITS = {"max_batch_size": 4, "max_input_len": 40, "max_seq_len": 64}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    return tiny_hf_dirs(tmp_path_factory.mktemp("serve-hf"), tokenizer)


@pytest.fixture(scope="session")
def engine(tmp_path_factory, hf_dir) -> Callable[..., Path]:
    """(variant, tp=1, pp=1, max_seq_len=64) -> an fp32 torch engine with :data:`LIMITS` (built once per session)."""
    root = tmp_path_factory.mktemp("serve-engines")

    def get(variant: str, tp: int = 1, pp: int = 1, max_seq_len: int = LIMITS["max_seq_len"]) -> Path:
        out = root / f"{variant}-tp{tp}pp{pp}-seq{max_seq_len}"
        return build_engine_dir(hf_dir(variant), out, tp, pp, limits={**LIMITS, "max_seq_len": max_seq_len})

    return get
