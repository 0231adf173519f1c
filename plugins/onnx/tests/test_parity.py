"""onnx engines run by onnxruntime against transformers (fp32) and the torch backend (fp16)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import open_runner
from modelc_plugins.onnx.testing import left_padded, local_runner, prefill_logits, teacher_forced_logits

VARIANTS = ("rw", "7b", "40b", "falcon2")
NEW_TOKENS = 12


def hf_greedy(model_dir, prompts, new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, ids.shape[1] :].tolist(), logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_greedy_tokens_equal_hf(falcons, variant):
    prompts = falcons.prompts()
    want, hf_logits = hf_greedy(falcons.hf(variant), prompts, NEW_TOKENS)
    runner, _ = open_runner(falcons.engine(variant, "onnx"), "cpu")
    got = generate(runner, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS, end_id=None, pad_id=0))
    assert [beams[0] for beams in got] == want
    ids, mask = left_padded(prompts)
    logits = prefill_logits(runner, ids, mask)
    assert (logits - hf_logits)[mask.bool()].abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_close_to_torch_backend(falcons, variant):
    prompts = falcons.prompts()
    ids, mask = left_padded(prompts)
    onnx_runner = local_runner(falcons.engine(variant, "onnx", "float16"))
    torch_runner = local_runner(falcons.engine(variant, "torch", "float16"))
    onnx_logits, torch_logits = prefill_logits(onnx_runner, ids, mask), prefill_logits(torch_runner, ids, mask)
    assert onnx_logits.dtype == torch.float32
    real = mask.bool()
    # fp16 rounding differs between onnxruntime's kernels and torch's: ~1e-2 on logits of size ~8.
    assert (onnx_logits - torch_logits)[real].abs().max().item() < 5e-2
    assert torch.equal(onnx_logits.argmax(-1)[real], torch_logits.argmax(-1)[real])
    # Decode steps through each backend's KV cache, fed the same tokens. (Comparing free-running
    # greedy tokens would trip over fp16 ties: random tiny models have exactly tied top logits.)
    config = GenerationConfig(max_new_tokens=6, end_id=None, pad_id=0)
    tokens = torch.tensor([beams[0] for beams in generate(torch_runner, prompts, config)])
    torch_steps = teacher_forced_logits(torch_runner, prompts, tokens[:, :-1])
    onnx_steps = teacher_forced_logits(onnx_runner, prompts, tokens[:, :-1])
    assert torch.equal(torch_steps.argmax(-1), tokens)
    assert (onnx_steps - torch_steps).abs().max().item() < 5e-2


def test_beam_search_reorders_the_cache_like_torch(falcons):
    prompts = falcons.prompts()
    config = GenerationConfig(max_new_tokens=8, num_beams=3, end_id=None, pad_id=0)
    onnx_out = generate(local_runner(falcons.engine("40b", "onnx")), prompts, config)
    assert onnx_out == generate(local_runner(falcons.engine("40b", "torch")), prompts, config)
    assert len(onnx_out[0]) == 3
