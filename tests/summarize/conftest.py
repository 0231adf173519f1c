"""Fixtures for the summarize tests: one tiny Falcon, its fp32 engines at tp1 and tp2, small datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler_core.testing import build_engine_dir

VARIANT = "7b"


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    return make_tiny_falcon(tmp_path_factory.mktemp("sum-hf") / VARIANT, VARIANT, num_layers=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def engines(tmp_path_factory, hf_dir) -> dict[int, Path]:
    """tp -> fp32 torch engine of ``hf_dir``."""
    root = tmp_path_factory.mktemp("sum-engines")
    return {tp: build_engine_dir(hf_dir, root / f"tp{tp}", tp) for tp in (1, 2)}


@pytest.fixture(scope="session")
def rows() -> list[dict[str, str]]:
    """Three articles in the cnn_dailymail layout (the first rows of the shipped sample)."""
    from compiler_core.evaluate.summarize import load_articles

    return [{"article": a.article, "highlights": a.highlights} for a in load_articles()[:3]]


@pytest.fixture(scope="session")
def jsonl_dataset(tmp_path_factory, rows) -> Path:
    path = tmp_path_factory.mktemp("sum-data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("sum-data") / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
