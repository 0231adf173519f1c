"""Fixtures for the FP8 tests: tiny Falcon checkpoints of every variant, briefly trained.

Random-weight tiny models predict nearly uniformly, so their top-1 token flips under any
perturbation (even a bfloat16 cast agrees on only ~98% of positions). 80 AdamW steps on the
shipped corpus give them real next-token margins, which is what top-1 agreement measures on
real models; the HF model is then the unquantized reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import torch

from modelc_plugins.quant_fp8.testing import CALIB, VARIANTS

TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEQ, TRAIN_LR = 80, 8, 64, 1e-2
EVAL_LEN = 192


@pytest.fixture(scope="session")
def tokenizer():
    from modelc_plugins.falcon.tiny import train_tokenizer

    return train_tokenizer()


def _train(model, ids: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    threads = torch.get_num_threads()
    # Tiny GEMMs: one thread is ~10x cheaper than two fighting over a busy 2-core machine.
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(TRAIN_STEPS):
            starts = torch.randint(0, len(ids) - TRAIN_SEQ, (TRAIN_BATCH,), generator=gen)
            batch = torch.stack([ids[s : s + TRAIN_SEQ] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """variant -> a 2-layer tiny HF Falcon trained for a few steps on the shipped corpus (made once)."""
    from transformers import FalconForCausalLM

    from compiler_core.quantize.calibration import default_corpus
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    root, made = tmp_path_factory.mktemp("fp8_hf"), {}
    corpus = torch.tensor(tokenizer(default_corpus())["input_ids"])

    def get(variant: str) -> Path:
        if variant not in made:
            seed_dir = make_tiny_falcon(
                root / f"{variant}-init", variant, num_layers=2, tokenizer=tokenizer, initializer_range=0.02
            )
            torch.manual_seed(0)
            model = FalconForCausalLM.from_pretrained(seed_dir)
            _train(model, corpus, seed=VARIANTS.index(variant))
            out = root / variant
            model.save_pretrained(out, max_shard_size="64KB")
            tokenizer.save_pretrained(out)
            made[variant] = out
        return made[variant]

    return get


@pytest.fixture(scope="session")
def eval_ids(tokenizer) -> torch.Tensor:
    """[2, EVAL_LEN] ids of two articles of the shipped summarize sample (text not used to calibrate)."""
    lines = resources.files("compiler_core").joinpath("data/summarize_sample.jsonl").read_text().splitlines()
    articles = [json.loads(line)["article"] for line in lines[:2]]
    return torch.tensor([tokenizer(a)["input_ids"][:EVAL_LEN] for a in articles])


@pytest.fixture(scope="session")
def hf_logits(hf_dir, eval_ids) -> Callable[[str], torch.Tensor]:
    """variant -> transformers' (sdpa) float32 logits of ``eval_ids``: the unquantized reference."""
    from transformers import AutoModelForCausalLM

    made = {}

    def get(variant: str) -> torch.Tensor:
        if variant not in made:
            model = AutoModelForCausalLM.from_pretrained(hf_dir(variant), attn_implementation="sdpa").eval()
            with torch.no_grad():
                made[variant] = model(input_ids=eval_ids).logits.float()
        return made[variant]

    return get


@pytest.fixture(scope="session")
def fp8_dir(tmp_path_factory, hf_dir) -> Callable[..., Path]:
    """(variant, qformat, kv_cache_dtype, tp, pp, dtype) -> a quantized checkpoint (made once per session)."""
    from compiler_core.mapping import Mapping
    from compiler_core.quantize.ptq import quantize

    root, made = tmp_path_factory.mktemp("fp8_ckpt"), {}

    def get(
        variant: str, qformat: str = "fp8", kv: str | None = "fp8", tp: int = 1, pp: int = 1, dtype: str = "float32"
    ) -> Path:
        key = (variant, qformat, kv, tp, pp, dtype)
        if key not in made:
            out = root / f"{variant}-{qformat}-kv{kv}-tp{tp}-pp{pp}-{dtype}"
            quantize(
                hf_dir(variant),
                out,
                qformat=qformat,
                kv_cache_dtype=kv,
                dtype=dtype,
                mapping=Mapping.create(tp, pp),
                device="cpu",
                show_progress=False,
                **CALIB,
            )
            made[key] = out
        return made[key]

    return get
