"""Float32 engines over bfloat16-valued weights: held as bfloat16, multiplied in float32 by a C kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compiler_core.backends.torch import cpu_linear as cpu_linear_module
from compiler_core.backends.torch.cpu_linear import (
    MAX_BF16_KERNEL_ROWS,
    bf16_kernel,
    bf16_linear,
    bf16_storage,
    bf16_valued,
)
from compiler_core.backends.torch.native import unavailable_reason
from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import special_ids
from compiler_core.testing import hf_generate, strip_padding

pytestmark = pytest.mark.skipif(
    bf16_kernel() is None, reason=f"no bfloat16 linear kernel here: {unavailable_reason('bf16_linear')}"
)


def bf16_numbers(*shape: int, scale: float = 0.05) -> torch.Tensor:
    """A float32 tensor of random values that are all bfloat16 numbers."""
    return (torch.randn(*shape) * scale).to(torch.bfloat16).float()


def test_bf16_valued_tells_exact_weights_apart():
    weight = bf16_numbers(300, 7000)  # more elements than one slice of the check
    assert bf16_valued(weight)
    weight[-1, -1] += 2.0**-20  # one value off the bfloat16 grid, in the last slice
    assert not bf16_valued(weight)
    assert not bf16_valued(torch.randn(64, 64))
    assert not bf16_valued(torch.zeros(64, 64, dtype=torch.bfloat16))  # already bfloat16: not a float32 weight


@pytest.mark.parametrize("in_features", [1024, 1003, 40, 7])  # whole 32-blocks, then 8-wide and scalar tails
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, MAX_BF16_KERNEL_ROWS + 1, 70, 200])  # kernel, oneDNN, BLAS
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_equals_float32_linear(rows, in_features, with_bias):
    torch.manual_seed(rows * in_features)
    weight = bf16_numbers(257, in_features)
    bias = torch.randn(257) if with_bias else None
    x = torch.randn(rows, in_features)
    linear = bf16_linear(weight.to(torch.bfloat16), bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, MAX_BF16_KERNEL_ROWS + 1])
def test_bfloat16_inputs_accumulate_in_float32_and_round_once(rows):
    """A bfloat16 engine's linear: float32 accumulation, one rounding per output, as torch's own."""
    torch.manual_seed(rows)
    weight, bias = (torch.randn(300, 1000) * 0.05).to(torch.bfloat16), torch.randn(300).to(torch.bfloat16)
    x = torch.randn(rows, 1000).to(torch.bfloat16)
    out = bf16_linear(weight, bias)(x)
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.double(), weight.double(), bias.double())
    # Within one bfloat16 rounding of the exact value (2^-8 relative), far inside a bf16 product's error.
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)


def test_kernel_takes_any_leading_shape_and_strided_rows():
    weight = bf16_numbers(96, 256)
    linear = bf16_linear(weight.to(torch.bfloat16), None)
    x = torch.randn(2, 3, 512)[..., ::2]
    out = linear(x)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_kernel_uses_several_threads_like_one():
    weight, x = bf16_numbers(4096, 512), torch.randn(3, 512)
    linear = bf16_linear(weight.to(torch.bfloat16), None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = linear(x)
        torch.set_num_threads(1)
        one = linear(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is one thread's dot product, whatever the split


def test_storage_only_for_large_exact_contiguous_float32_weights(monkeypatch):
    exact = bf16_numbers(1024, 1024)
    held = bf16_storage(exact)
    assert held is not None and held.dtype == torch.bfloat16 and torch.equal(held.float(), exact)
    assert bf16_storage(torch.randn(1024, 1024)) is None  # not bfloat16 numbers: kept as float32
    already = exact.to(torch.bfloat16)
    assert bf16_storage(already) is already  # a bfloat16 engine's weight: used as it is, no copy
    assert bf16_storage(bf16_numbers(64, 64)) is None  # small: stays in cache anyway
    assert bf16_storage(bf16_numbers(1024, 2048)[:, ::2]) is None  # strided
    monkeypatch.setenv("MODELC_BF16_WEIGHTS", "0")
    bf16_kernel.cache_clear()
    try:
        assert bf16_storage(exact) is None
    finally:
        monkeypatch.delenv("MODELC_BF16_WEIGHTS")
        bf16_kernel.cache_clear()


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory, tokenizer):
    """variant -> a tiny Falcon saved in bfloat16, as the published checkpoints are."""
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    root, made = tmp_path_factory.mktemp("bf16-hf"), {}

    def get(variant: str):
        if variant not in made:
            made[variant] = make_tiny_falcon(
                root / variant, variant, num_layers=2, dtype="bfloat16", tokenizer=tokenizer
            )
        return made[variant]

    return get


@pytest.mark.parametrize(("variant", "tp"), [("rw", 1), ("7b", 1), ("40b", 1), ("40b", 2)])
def test_float32_engine_of_a_bf16_checkpoint_matches_transformers(
    registry, variant, tp, bf16_checkpoints, tmp_path, monkeypatch, prompt_ids
):
    """A float32 build of a bfloat16 checkpoint: every linear and the embedding are held as
    bfloat16 (half the bytes), every decode step runs the kernel, and the greedy tokens equal
    transformers' float32 model of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    from compiler_core.build.engine import (
        build_engine,
        choose_backend,
        engine_mapping,
        load_rank_session,
        read_engine_config,
    )
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping
    from compiler_core.runtime.runner import LocalRunner

    hf_dir = bf16_checkpoints(variant)
    convert(hf_dir, tmp_path / "ckpt", dtype="float32", mapping=Mapping.create(tp, 1), show_progress=False)
    build_engine(tmp_path / "ckpt", tmp_path / "engine", choose_backend("torch")[0], {}, show_progress=False)

    monkeypatch.setattr(cpu_linear_module, "MIN_BF16_WEIGHT_ELEMENTS", 0)  # the tiny weights are small
    kernel, kernel_rows = bf16_kernel(), []

    def counted(*args):
        kernel_rows.append(args[4])
        return kernel(*args)

    monkeypatch.setattr(cpu_linear_module, "bf16_kernel", lambda: counted)
    config = read_engine_config(tmp_path / "engine")
    mapping = engine_mapping(config)
    runner = LocalRunner(
        [load_rank_session(registry, tmp_path / "engine", r, "cpu", config) for r in mapping.ranks()], mapping
    )
    for session in runner.sessions:
        executor = session.executor
        for node in [*executor.graph.nodes_of("linear"), *executor.graph.nodes_of("embedding")]:
            assert executor.weights[node.params["weight"]].dtype == torch.bfloat16, node.name

    end_id, _ = special_ids(config)
    ours = [beams[0] for beams in generate(runner, prompt_ids, GenerationConfig(16, end_id=end_id, pad_id=0))]
    # A decode step feeds one row per prompt through every linear of every rank: the kernel ran them.
    linears = sum(len(list(session.executor.graph.nodes_of("linear"))) for session in runner.sessions)
    assert kernel_rows.count(len(prompt_ids)) >= linears

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ref = hf_generate(reference, prompt_ids, 0, max_new_tokens=16, do_sample=False)
    assert [strip_padding(row, len(seq), {0}) for row, seq in zip(ref, ours, strict=True)] == ours


@pytest.mark.parametrize(("variant", "tp"), [("7b", 1), ("40b", 2)])
def test_bfloat16_engine_takes_the_kernel_within_verify_tolerance(variant, tp, bf16_checkpoints, tmp_path, monkeypatch):
    """A bfloat16 engine's linears run through the kernel and its logits stay within verify's
    bfloat16 tolerance of transformers' bfloat16 model, over a prompt pass and decode steps."""
    from compiler_core.convert.from_hf import convert
    from compiler_core.evaluate.verify import compare, hf_trace, load_hf_model, make_batch, runner_trace
    from compiler_core.mapping import Mapping
    from compiler_core.runtime.loading import checkpoint_runner

    hf_dir = bf16_checkpoints(variant)
    convert(hf_dir, tmp_path / "ckpt", dtype="bfloat16", mapping=Mapping.create(tp, 1), show_progress=False)
    monkeypatch.setattr(cpu_linear_module, "MIN_BF16_WEIGHT_ELEMENTS", 0)
    kernel, calls = bf16_kernel(), []

    def counted(*args):
        calls.append(args[4])
        return kernel(*args)

    monkeypatch.setattr(cpu_linear_module, "bf16_kernel", lambda: counted)
    batch = make_batch(hf_dir, hf_dir, 10**9)
    runner = checkpoint_runner(tmp_path / "ckpt")
    got = runner_trace(runner, batch, 8)
    assert calls.count(len(batch.ids)) >= 7  # every decode step's linears ran through the kernel
    ref = hf_trace(load_hf_model(hf_dir, "bfloat16", "cpu"), batch, 8)
    report = compare(ref, got, batch, "bfloat16")
    assert report.passed, report.lines()


def test_a_kernel_asking_for_a_compact_loaded_weight_gets_it_in_its_declared_dtype(monkeypatch):
    """Weights loaded compact (bfloat16 for a float32 parameter): the linear takes them as they are,
    while a kernel that asks through ``param`` (a plugin's op, say) gets float32, widened once."""
    from compiler_core.backends.torch.kernels import TorchLowering
    from compiler_core.ir.graph import GraphBuilder

    monkeypatch.setattr(cpu_linear_module, "MIN_BF16_WEIGHT_ELEMENTS", 0)
    g = GraphBuilder("compact")
    w = g.param("fc.weight", [16, 8], "float32")
    h = g.add("linear", ["x"], name="fc", params={"weight": w})
    h = g.add("linear", [h], name="custom", params={"weight": g.param("custom.weight", [8, 16], "float32")})
    graph = g.build(["x"], [h], {"dtype": "float32"})
    held = {name: bf16_numbers(*graph.params[name].shape).to(torch.bfloat16) for name in graph.params}
    low = TorchLowering(held, torch.device("cpu"), graph)
    fc, custom = graph.nodes
    assert low.bf16_param(fc, "weight") is held["fc.weight"]
    first, again = low.param(custom, "weight"), low.param(custom, "weight")
    assert first.dtype == torch.float32 and first is again
    assert torch.equal(first, held["custom.weight"].float())
