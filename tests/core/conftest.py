"""Fixtures for the core tests: tiny Falcon checkpoints made at test time and throwaway plugins."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Falcon-RW style Hugging Face checkpoint (ALiBi, biases), in several shards."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    return make_tiny_falcon(tmp_path_factory.mktemp("hf") / "falcon-rw", "rw", num_layers=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_falcon_7b(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Falcon-7B style checkpoint (rotary, multi-query, parallel attention)."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    return make_tiny_falcon(tmp_path_factory.mktemp("hf") / "falcon-7b", "7b", num_layers=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def falcon_checkpoint_tp2(tmp_path_factory, tiny_falcon) -> Path:
    """``tiny_falcon`` converted to a tp=2 modelc checkpoint (read-only for tests: copy before changing)."""
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    out = tmp_path_factory.mktemp("ckpt") / "rw-tp2"
    convert(tiny_falcon, out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_engine_7b(tmp_path_factory, tiny_falcon_7b) -> Path:
    """``tiny_falcon_7b`` as a float32 torch engine; its checkpoint lies beside it as ``<engine>-ckpt``
    (both read-only for tests: copy before changing)."""
    from compiler_core.testing import build_engine_dir

    return build_engine_dir(tiny_falcon_7b, tmp_path_factory.mktemp("engine") / "falcon-7b")
