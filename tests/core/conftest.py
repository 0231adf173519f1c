"""Fixtures for the core tests: tiny Falcon checkpoints made at test time and throwaway plugins."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler_core.plugins import get_plugin_manager, register_checked
from compiler_core.registry import reset_registry

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def plugin_registered(plugin: object, name: str) -> Iterator[None]:
    """Register ``plugin`` into the process-wide manager for the duration of a ``with`` block.

    The registry is rebuilt on entry and exit, so what the plugin registers is visible only
    inside the block.
    """
    pm = get_plugin_manager()
    register_checked(pm, plugin, name)
    reset_registry()
    try:
        yield
    finally:
        pm.unregister(plugin, name=name)
        reset_registry()


def run_modelc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, python: str | None = None):
    """Run ``python -m compiler_core ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [python or sys.executable, "-m", "compiler_core", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture(scope="session")
def tokenizer():
    from plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Falcon-RW style Hugging Face checkpoint (ALiBi, biases), in several shards."""
    from plugins.falcon.tiny import make_tiny_falcon

    return make_tiny_falcon(tmp_path_factory.mktemp("hf") / "falcon-rw", "rw", num_layers=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_falcon_7b(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Falcon-7B style checkpoint (rotary, multi-query, parallel attention)."""
    from plugins.falcon.tiny import make_tiny_falcon

    return make_tiny_falcon(tmp_path_factory.mktemp("hf") / "falcon-7b", "7b", num_layers=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def falcon_checkpoint_tp2(tmp_path_factory, tiny_falcon) -> Path:
    """``tiny_falcon`` converted to a tp=2 modelc checkpoint (read-only for tests: copy before changing)."""
    from compiler_core.convert import convert
    from compiler_core.mapping import Mapping

    out = tmp_path_factory.mktemp("ckpt") / "rw-tp2"
    convert(tiny_falcon, out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    return out
