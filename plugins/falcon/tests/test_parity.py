"""Every Falcon variant under every split matches transformers' FalconForCausalLM (SDPA):
fp32 logits within 1e-4 over a left-padded batch of two prompts, 32 identical greedy tokens,
and half-precision conversions of the right dtype within verify's tolerance."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from compiler_core.evaluate.verify import FP32_ATOL, compare, runner_trace
from compiler_core.formats.checkpoint import rank_file, read_config
from compiler_core.runtime.loading import checkpoint_runner
from modelc_plugins.falcon.testing import SPLITS, STEPS
from modelc_plugins.falcon.tiny import VARIANTS


@pytest.mark.parametrize("tp,pp", SPLITS, ids=[f"tp{t}pp{p}" for t, p in SPLITS])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_logits_and_greedy_tokens_match_transformers(variant, tp, pp, tiny, batch, reference, converted):
    model_dir = tiny(variant)
    ref = reference(model_dir)
    got = runner_trace(checkpoint_runner(converted(model_dir, tp, pp)), batch, STEPS)
    report = compare(ref, got, batch, "float32")
    assert report.prompt_diff <= FP32_ATOL, report.lines()
    assert report.decode_diff <= FP32_ATOL, report.lines()
    assert torch.equal(got.tokens, ref.tokens), report.lines()
    assert got.tokens.shape == (2, STEPS)
    # Not a degenerate model: logits far from zero, and the prompts continue differently.
    assert report.logit_scale > 1.0 and not torch.equal(ref.tokens[0], ref.tokens[1])


HALF_CASES = [(v, d) for v in sorted(VARIANTS) for d in ("float16", "bfloat16")]


@pytest.mark.parametrize("variant,dtype", HALF_CASES, ids=[f"{v}-{d}" for v, d in HALF_CASES])
def test_half_precision_dtypes_and_tolerance(variant, dtype, tiny, batch, reference, converted):
    model_dir = tiny(variant)
    ckpt = converted(model_dir, 2, 2, dtype)
    config = read_config(ckpt)
    assert config.dtype == dtype
    for rank in config.mapping.ranks():
        with safe_open(str(rank_file(ckpt, rank)), "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        assert dtypes == {"F16" if dtype == "float16" else "BF16"}
    steps = 8
    ref = reference(model_dir, dtype, steps)
    report = compare(ref, runner_trace(checkpoint_runner(ckpt), batch, steps), batch, dtype)
    assert report.passed, report.lines()
    # The half-precision reference really is a different computation from fp32's, and the
    # tolerance is far tighter than what a broken conversion gives (see test_verify).
    assert report.tolerance < 0.1 * report.logit_scale
