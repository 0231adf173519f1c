"""Fixtures for the INT4-AWQ tests: tiny Falcon checkpoints of every variant and their quantized forms.

Tiny models have hidden size 64 (and 256-wide MLPs), so the tests use group_size 16: four
groups per row of the narrowest weight, and two per rank for the row-parallel layers at tp 2.

Random weights have no salient activation channels, which is what AWQ exists for: trained LLMs
have a few hidden channels whose layer-norm outputs are far larger than the rest. The tiny
models get such channels by scaling three channels of every decoder layer norm's weight by 8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from modelc_plugins.quant_awq.testing import CALIB, GROUP_SIZE, add_outlier_channels


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """variant -> a 2-layer random-weight Hugging Face Falcon checkpoint with outlier channels
    (made once per session)."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    root, made = tmp_path_factory.mktemp("hf"), {}

    def get(variant: str) -> Path:
        if variant not in made:
            base = make_tiny_falcon(root / f"{variant}-random", variant, num_layers=2, tokenizer=tokenizer)
            made[variant] = add_outlier_channels(base, root / variant, tokenizer)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def awq_dir(tmp_path_factory, hf_dir) -> Callable[..., Path]:
    """(variant, tp=1, pp=1, dtype="float32") -> an int4_awq checkpoint of ``hf_dir(variant)``
    (made once per session)."""
    from compiler_core.mapping import Mapping
    from compiler_core.quantize.ptq import quantize

    root, made = tmp_path_factory.mktemp("awq"), {}

    def get(variant: str, tp: int = 1, pp: int = 1, dtype: str = "float32") -> Path:
        key = (variant, tp, pp, dtype)
        if key not in made:
            out = root / f"{variant}-tp{tp}-pp{pp}-{dtype}"
            quantize(
                hf_dir(variant),
                out,
                qformat="int4_awq",
                group_size=GROUP_SIZE,
                mapping=Mapping.create(tp, pp),
                dtype=dtype,
                device="cpu",
                show_progress=False,
                **CALIB,
            )
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def eval_ids(tokenizer) -> torch.Tensor:
    """[2, 64] token ids from the end of the shipped corpus (away from the calibration blocks)."""
    from compiler_core.quantize.calibration import default_corpus

    ids = tokenizer(default_corpus()[-8000:])["input_ids"]
    return torch.tensor(ids[-128:]).view(2, 64)
