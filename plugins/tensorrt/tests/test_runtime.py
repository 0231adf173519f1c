"""Executing TensorRT engines: needs a GPU that runs them (skipped elsewhere, with the reason)."""

from __future__ import annotations

import pytest

from compiler_core.errors import UsageError
from compiler_core.runtime.generation import GenerationConfig, generate
from modelc_plugins.onnx.testing import left_padded, local_runner, prefill_logits
from modelc_plugins.tensorrt.testing import TEST_SETTINGS, build_checkpoint, run_skip_reason

pytestmark = pytest.mark.skipif(run_skip_reason() is not None, reason=str(run_skip_reason()))

CONFIG = GenerationConfig(max_new_tokens=8, end_id=None, pad_id=0)


@pytest.mark.parametrize("variant", ["rw", "7b", "40b", "falcon2"])
def test_fp16_engine_matches_torch_backend(falcons, tmp_path, variant):
    build_checkpoint(falcons.checkpoint(variant, "float16"), tmp_path / "trt")
    prompts = falcons.prompts()
    ids, mask = left_padded(prompts)
    engine = local_runner(tmp_path / "trt", "cuda")
    reference = local_runner(falcons.engine(variant, "torch", "float16"), "cuda")
    got, want = prefill_logits(engine, ids.cuda(), mask.cuda()), prefill_logits(reference, ids.cuda(), mask.cuda())
    real = mask.cuda().bool()
    assert (got - want)[real].abs().max().item() < 5e-2
    assert generate(engine, prompts, CONFIG) == generate(reference, prompts, CONFIG)


def test_tensor_parallel_segments_match_one_rank(falcons, tmp_path):
    build_checkpoint(falcons.checkpoint("rw", "float16"), tmp_path / "tp1")
    build_checkpoint(falcons.checkpoint("rw", "float16", tp=2), tmp_path / "tp2")
    prompts = falcons.prompts()
    one, two = local_runner(tmp_path / "tp1", "cuda"), local_runner(tmp_path / "tp2", "cuda")
    assert generate(two, prompts, CONFIG) == generate(one, prompts, CONFIG)


def test_rows_beyond_max_batch_size_are_refused(falcons, tmp_path):
    build_checkpoint(falcons.checkpoint("40b", "float16"), tmp_path / "trt")
    runner = local_runner(tmp_path / "trt", "cuda")
    with pytest.raises(UsageError, match="--max_batch_size"):
        runner.allocate(TEST_SETTINGS["max_batch_size"] + 1, 8)
