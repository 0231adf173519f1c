"""Session fixtures for the Falcon plugin tests: each tiny HF model and each transformers
reference trace is made once and shared (generating HF tokens is the slow part)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelc_plugins.falcon.testing import STEPS


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One intra-op thread while this package's tests run: fastest for 64-wide models, and on a
    busy machine two OpenMP threads stall every small op at their barrier (measured: 32 greedy
    steps took 9.8 CPU s with two threads, 0.07 s with one). Restored afterwards."""
    from modelc_plugins.falcon.testing import single_torch_thread

    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer) -> Callable[..., Path]:
    """``tiny(variant, name=None, **overrides)`` -> a cached 3-layer HF Falcon checkpoint dir."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def make(variant: str, name: str | None = None, dtype: str = "float32", **overrides: Any) -> Path:
        key = name or f"{variant}-{dtype}"
        if key not in cache:
            cache[key] = make_tiny_falcon(root / key, variant, tokenizer=tokenizer, dtype=dtype, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def batch(tiny):
    """The default verify batch (two prompts of different lengths, left padded)."""
    from compiler_core.evaluate.verify import make_batch

    model_dir = tiny("rw")
    return make_batch(model_dir, model_dir, 10**9)


@pytest.fixture(scope="session")
def reference(tiny, batch) -> Callable[..., Any]:
    """``reference(model_dir, dtype, steps)`` -> the cached transformers Trace of ``batch``."""
    from compiler_core.evaluate.verify import hf_trace, load_hf_model

    cache: dict[tuple[Path, str, int], Any] = {}

    def get(model_dir: Path, dtype: str = "float32", steps: int = STEPS):
        key = (Path(model_dir), dtype, steps)
        if key not in cache:
            cache[key] = hf_trace(load_hf_model(model_dir, dtype, "cpu"), batch, steps)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Callable[..., Path]:
    """``converted(model_dir, tp, pp, dtype="float32", **kw)`` -> a cached modelc checkpoint dir."""
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[tuple, Path] = {}

    def get(model_dir: Path, tp: int = 1, pp: int = 1, dtype: str = "float32", **kw: Any) -> Path:
        key = (Path(model_dir), tp, pp, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"{Path(model_dir).name}-tp{tp}pp{pp}-{dtype}-{len(cache)}"
            convert(model_dir, out, dtype=dtype, mapping=Mapping.create(tp, pp), show_progress=False, **kw)
            cache[key] = out
        return cache[key]

    return get
