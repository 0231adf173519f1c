"""Engines on the CUDA fast path against the reference executor, for every Falcon variant.

These need a CUDA GPU on which the Triton kernels are taken (sm_89+, triton installed) and skip
with that reason elsewhere. Models are tiny random-weight Falcons made in memory (hidden 96, so
the INT4 layers with group 64 have a ragged last group as falcon-7b's 4544 inputs do), quantized
on the CPU by the project's own schemes; the same weights then feed a CPU engine (the reference:
float32 kernels, FP8 emulated, INT4 dequantized once) and a CUDA engine (Triton decode attention,
FP8 GEMM and INT4 GEMM; decode steps replayed as CUDA graphs).

Stated tolerances (prompt logits, ‖cuda - cpu‖ / ‖cpu‖):
* float32 and INT4 float32 engines: only the accumulation order differs, < 1e-4, and the greedy
  tokens of prompts of different lengths (left padding) are identical.
* FP8 float32 engines: the activation codes are the same function, but an accumulation-order
  difference (and Hopper's FP8 tensor cores accumulate with fewer than float32's bits) can move
  a value across an E4M3 rounding boundary (one code step is 1/8 of its magnitude) in a later
  layer, and these random tiny models amplify it: < 8e-2 and top-1 agreement >= 85% of positions
  (measured on an H200: up to 5.0%, for the ALiBi variant with the FP8 KV cache).
* bfloat16 engines against the same bfloat16 engines on CPU: < 3e-2 and top-1 >= 90% (bfloat16
  rounding with another accumulation order; bfloat16 itself is ~1e-2 from float32 here), and for
  FP8 < 1e-1 and top-1 >= 80% (in bfloat16 more activations land near an E4M3 rounding boundary:
  the bfloat16 CPU engine is 6-8% from the float32 one).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from compiler_core.registry import Registry

CUDA = torch.device("cuda")
VARIANTS = ("rw", "7b", "40b", "180b", "falcon2")
HIDDEN, GROUP, VOCAB, LAYERS = 96, 64, 384, 2
#: Two prompts of different lengths (the shorter left-padded): 41 real positions.
PROMPTS = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (24, 17)]
NEW_TOKENS = 12


def _fast_path_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: these tests check the GPU fast path"
    from compiler_core.backends.torch.cuda.capability import triton_ready

    if not triton_ready(CUDA):
        return "the Triton kernels are not taken here (GPU below sm_89, triton missing, or MODELC_TRITON=0)"
    return None


pytestmark = [
    pytest.mark.skipif(_fast_path_reason() is not None, reason=_fast_path_reason() or ""),
    # A kernel that fails its load-time probe falls back with a warning and the engine stays right;
    # here that would leave the fast path untested, so it fails the test.
    pytest.mark.filterwarnings("error:.*not using it:UserWarning"),
]


def loaded_model(registry: Registry, variant: str):
    """A random tiny Falcon ``variant`` as a float32 modelc LoadedModel (in memory, tp1)."""
    from transformers import FalconForCausalLM

    from compiler_core.convert.from_hf import LoadedModel, map_tensors
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.mapping import Mapping
    from modelc_plugins.falcon.tiny import randomize_norms_and_biases, tiny_config

    torch.manual_seed(VARIANTS.index(variant))
    hf = FalconForCausalLM(tiny_config(variant, vocab_size=VOCAB, num_layers=LAYERS, hidden_size=HIDDEN)).eval()
    randomize_norms_and_biases(hf)
    hf_dict = hf.config.to_dict()
    arch = registry.architecture_for_hf(hf_dict, "test")
    config = CheckpointConfig.from_model_fields(arch.config_from_hf(hf_dict), "float32", Mapping(), "test")
    state = {k: v.detach() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return LoadedModel(config, dict(map_tensors(arch, config, state.items(), "test")))


def calibration():
    from compiler_core.quantize.calibration import CalibrationBatch, CalibrationSet

    ids = torch.randint(0, VOCAB, (4, 1, 32), generator=torch.Generator().manual_seed(3))
    return CalibrationSet(tuple(CalibrationBatch(b, torch.ones_like(b)) for b in ids), "random tokens")


@functools.cache
def model_of(registry: Registry, variant: str, qformat: str):
    """The float32 model of ``variant``, quantized as ``qformat`` unless that is "float32" (made once per registry)."""
    model = loaded_model(registry, variant)
    return model if qformat in ("float32", "bfloat16") else quantized(registry, model, qformat)


def quantized(registry: Registry, model, qformat: str):
    """``model`` quantized as ``qformat``: "int4_awq", "fp8" (weights), "fp8_kv" (weights and the KV
    cache) or "kv_fp8" (the KV cache alone, float weights)."""
    from compiler_core.convert.from_hf import LoadedModel

    copy = LoadedModel(model.config, dict(model.weights))
    scheme = registry.quant_schemes["int4_awq" if qformat == "int4_awq" else "fp8"]
    options = {
        "registry": registry,
        "device": "cpu",
        "show_progress": False,
        "exclude_modules": None,
        "group_size": GROUP,
    }
    if qformat == "int4_awq":
        return scheme.quantize(copy, calibration(), {**options, "awq_max_tokens": 128})
    options["kv_cache_dtype"] = "fp8"
    if qformat == "kv_fp8":
        return scheme.quantize_kv_cache(copy, calibration(), options)
    out = scheme.quantize(copy, calibration(), options)
    return scheme.quantize_kv_cache(out, calibration(), options) if qformat == "fp8_kv" else out


def runner(registry: Registry, model, device, dtype: torch.dtype | None = None):
    """A LocalRunner of ``model`` on ``device`` (its float weights cast to ``dtype`` if given)."""
    from compiler_core.convert.from_hf import LoadedModel, rank_weights
    from compiler_core.dtypes import torch_dtype
    from compiler_core.mapping import Mapping
    from compiler_core.model import rank_graph
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.runtime.session import TorchSession

    if dtype is not None:
        config = dataclasses.replace(model.config, dtype=str(dtype).removeprefix("torch."))
        declared = rank_graph(registry, config, 0).params
        # Every wide float weight as the graph of that dtype declares it (FP8 scales stay float32).
        cast = {
            k: v.to(torch_dtype(declared[k].dtype))
            if k in declared and v.is_floating_point() and v.element_size() > 1
            else v
            for k, v in model.weights.items()
        }
        model = LoadedModel(config, cast)
    graph = rank_graph(registry, model.config, 0)
    session = TorchSession(registry, graph, rank_weights(registry, model, 0), device)
    return LocalRunner([session], Mapping())


def prompt_logits(run) -> torch.Tensor:
    """float32 logits [rows, positions, vocab] of the left-padded PROMPTS (real positions only)."""
    from compiler_core.runtime.context import positions_from_mask

    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    run.allocate(len(PROMPTS), width + 1)
    with torch.inference_mode():
        logits = run.logits(ids, positions_from_mask(mask), mask, 0).float().cpu()
    return logits[mask.bool()]


def greedy(run) -> list[list[int]]:
    from compiler_core.runtime.generation import GenerationConfig, generate

    return [beams[0] for beams in generate(run, PROMPTS, GenerationConfig(NEW_TOKENS))]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qformat", ["float32", "int4_awq"])
def test_float32_engine_on_cuda_matches_reference(registry, variant, qformat):
    model = model_of(registry, variant, qformat)
    cpu, cuda = runner(registry, model, "cpu"), runner(registry, model, CUDA)
    assert relative_error(prompt_logits(cuda), prompt_logits(cpu)) < 1e-4
    assert greedy(cuda) == greedy(cpu)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qformat", ["fp8", "fp8_kv"])
def test_fp8_engine_on_cuda_matches_emulation(registry, variant, qformat):
    model = model_of(registry, variant, qformat)
    cpu, cuda = runner(registry, model, "cpu"), runner(registry, model, CUDA)
    want, got = prompt_logits(cpu), prompt_logits(cuda)
    assert relative_error(got, want) < 8e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85
    assert len(greedy(cuda)[0]) == NEW_TOKENS  # decode steps (CUDA graphs over the Triton kernels) run


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qformat", ["bfloat16", "fp8_kv", "int4_awq"])
def test_bfloat16_engine_on_cuda_matches_cpu(registry, variant, qformat):
    model = model_of(registry, variant, qformat)
    want = prompt_logits(runner(registry, model, "cpu", torch.bfloat16))
    cuda = runner(registry, model, CUDA, torch.bfloat16)
    got = prompt_logits(cuda)
    fp8 = qformat.startswith("fp8")
    assert relative_error(got, want) < (1e-1 if fp8 else 3e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (0.8 if fp8 else 0.9)
    assert len(greedy(cuda)[1]) == NEW_TOKENS


def test_prefill_attention_builds_no_plan_per_length(registry):
    """Prompt passes of new lengths run no cuDNN attention: cuDNN builds a plan for each (query,
    key) length on the host (80-100 ms each on an H200), which serving paid on most prompt chunks."""
    from torch.profiler import ProfilerActivity, profile

    run = runner(registry, model_of(registry, "7b", "bfloat16"), CUDA, torch.bfloat16)
    run.allocate(1, 64)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        for length in (5, 17, 33):
            ids = torch.randint(0, VOCAB, (1, length))
            ones = torch.ones_like(ids)
            run.last_logits(ids, torch.arange(length)[None], ones, 0)
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert any("attention" in name for name in names)  # the profile does see the attention ops
    assert not [name for name in names if "cudnn" in name.lower()]


def test_new_sequence_prompts_run_flash_attention_on_shared_kv_heads(registry):
    """An unpadded prompt pass (new sequences) of an MQA model runs flash attention on its one KV
    head as stored: no copy of K/V per query head, and no fall-back to the math kernel."""
    from torch.profiler import ProfilerActivity, profile

    run = runner(registry, model_of(registry, "7b", "bfloat16"), CUDA, torch.bfloat16)
    run.sessions[0].decode_mode = "dynamic"  # no graph: the profile sees the aten ops themselves
    run.allocate(1, 64)
    ids = torch.randint(0, VOCAB, (1, 33))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        run.last_logits(ids, torch.arange(33)[None], torch.ones_like(ids), 0, new_sequences=True)
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention" in names
    assert "aten::repeat_interleave" not in names
    assert "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize(("heads", "kv_heads"), [(71, 1), (128, 8), (32, 8)])
def test_flash_attention_takes_shared_kv_heads(heads, kv_heads):
    """Flash attention alone (no other SDPA backend allowed) runs causal attention with shared KV
    heads at Falcon's head size and gives the result of K/V repeated per query head."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=CUDA).manual_seed(heads)
    q = torch.randn(2, heads, 100, 64, generator=gen, device=CUDA, dtype=torch.bfloat16)
    k, v = (torch.randn(2, kv_heads, 100, 64, generator=gen, device=CUDA, dtype=torch.bfloat16) for _ in "kv")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    groups = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1), is_causal=True
    )
    assert relative_error(got.float(), want) < 1e-2


def static_step(registry: Registry, model, device, dtype: torch.dtype, decode_mode: str = "static"):
    """(float32 logits, {slot: (k, v)} caches) after PROMPTS and one static decode step of ``model``
    on ``device`` in ``dtype``; the new token of each row is written at cache column ``width``."""
    run = runner(registry, model, device, dtype)
    session = run.sessions[0]
    session.decode_mode = decode_mode
    prompt_logits(run)  # fills the cache columns 0 .. width - 1 (left-padded prompts)
    width = max(len(p) for p in PROMPTS)
    mask = (torch.arange(width + 1)[None, :] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    ids = torch.tensor([[7], [300]][: len(PROMPTS)])
    positions = torch.tensor([[len(p)] for p in PROMPTS])
    with torch.inference_mode():
        logits = run.logits(ids, positions, mask, width).float().cpu()
    return logits, {name: (slot.k.cpu(), slot.v.cpu()) for name, slot in session.cache.slots.items()}


@pytest.mark.parametrize("qformat", ["float32", "kv_fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_cache_write_is_the_torch_path_on_cuda(registry, monkeypatch, qformat, dtype):
    """The static step's fused rotary + KV-cache write (rope_cache_write) against the torch kernels
    it replaces, both on this GPU: the first layer, whose input both compute alike, writes the same
    cache bytes (an FP8 cache too); the logits differ only by the decode attention's summation."""
    from compiler_core.backends.torch import kernels
    from compiler_core.backends.torch.cuda import rope_cache

    calls = []
    original = rope_cache.rope_cache_write
    monkeypatch.setattr(rope_cache, "rope_cache_write", lambda *a, **k: calls.append(1) or original(*a, **k))
    # Both runs normalize with torch's LayerNorm, so the first layer's attention input is the same.
    monkeypatch.setattr(kernels, "triton_layer_norm", lambda *args: None)
    model = model_of(registry, "7b", qformat)
    fast_logits, fast_cache = static_step(registry, model, CUDA, dtype)
    assert len(calls) == LAYERS
    # The torch path on the same GPU: rotary, write_at and the FP8 encoding as separate kernels.
    monkeypatch.setattr(kernels, "triton_ready", lambda device: False)
    ref_logits, ref_cache = static_step(registry, model, CUDA, dtype)
    assert len(calls) == LAYERS
    width = max(len(p) for p in PROMPTS)
    first = next(iter(ref_cache))
    for got, want in zip(fast_cache[first], ref_cache[first], strict=True):
        assert torch.equal(got[:, :, width].view(torch.uint8), want[:, :, width].view(torch.uint8))
    assert relative_error(fast_logits, ref_logits) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("variant", ("7b", "rw", "40b"))
def test_served_prompt_chunks_replay_graphs_and_keep_greedy_tokens(registry, variant):
    """In-flight batching on CUDA: prompt chunks run as CUDA graphs (padded to a power of two) and
    decode steps as the captured step; every sequence gets the tokens of the prompt decoded alone
    on the CPU (float32)."""
    from compiler_core.runtime.generation import GenerationConfig, generate
    from compiler_core.serve.scheduler import SamplingParams, Scheduler, Sequence, Token
    from compiler_core.serve.slots import SlotRunner

    model = model_of(registry, variant, "float32")
    cuda, cpu = runner(registry, model, CUDA), runner(registry, model, "cpu")
    prompts = [
        torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 21, 9, 30)
    ]
    outputs: list[list[int]] = [[] for _ in prompts]
    scheduler = Scheduler(SlotRunner(cuda, 3, 128, 0), max_seq_len=64, prefill_chunk=8, max_queue=8)
    params = SamplingParams(max_tokens=10, temperature=0)
    sequences = [
        Sequence(p, params, lambda e, i=i: outputs[i].append(e.id) if isinstance(e, Token) else None)
        for i, p in enumerate(prompts)
    ]
    scheduler.submit(sequences[:2])
    for _ in range(3):
        scheduler.step()
    scheduler.submit(sequences[2:])
    while scheduler.stats()["busy"] or scheduler.stats()["waiting"]:
        scheduler.step()
    chunks = cuda.sessions[0]._chunks
    # A shape is captured at its second use: every one used again replays a graph.
    assert any(step.graph is not None for step in chunks.values())
    assert all(step.graph is not None for step in chunks.values() if step.uses > 1)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == generate(cpu, [prompt], GenerationConfig(10, temperature=0))[0][0]
