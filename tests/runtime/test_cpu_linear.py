"""The CPU linear fast path (oneDNN inner product for few rows): same results, used where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from compiler_core.backends.torch import cpu_linear as cpu_linear_module
from compiler_core.backends.torch.cpu_linear import MAX_ONEDNN_ROWS, cpu_linear, onednn_linear_supported
from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import special_ids
from compiler_core.testing import hf_generate, strip_padding

pytestmark = pytest.mark.skipif(
    not onednn_linear_supported(), reason="this torch build or CPU has no oneDNN float32 inner product"
)

ONEDNN_OP = "mkldnn::_linear_pointwise"


def ops_called(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1024), (1, 1, 1024), (8, 1, 1024), (2, 64, 1024), (3, 50, 1024)])
def test_onednn_linear_equals_f_linear(shape, with_bias):
    torch.manual_seed(0)
    weight = torch.randn(1536, 1024) * 0.02
    bias = torch.randn(1536) if with_bias else None
    x = torch.randn(*shape)
    linear = cpu_linear(weight, bias)
    assert linear is not None
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    rows = x.numel() // x.shape[-1]
    assert (ONEDNN_OP in ops_called(lambda: linear(x))) == (rows <= MAX_ONEDNN_ROWS)


def test_onednn_linear_takes_non_contiguous_rows():
    weight = torch.randn(1024, 1024) * 0.02
    x = torch.randn(1, 4, 2048)[..., ::2]
    torch.testing.assert_close(cpu_linear(weight, None)(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weight",
    [
        torch.zeros(64, 64),  # too small: the BLAS call is over before oneDNN starts reading
        torch.zeros(1024, 1024, dtype=torch.bfloat16),
        torch.zeros(1024, 2048)[:, ::2],  # not contiguous
    ],
    ids=["small", "bfloat16", "strided"],
)
def test_blas_stays_where_onednn_does_not_pay(weight):
    assert cpu_linear(weight, None) is None


def test_environment_turns_the_fast_path_off(monkeypatch):
    monkeypatch.setenv("MODELC_ONEDNN_LINEAR", "0")
    onednn_linear_supported.cache_clear()
    try:
        assert cpu_linear(torch.zeros(1024, 1024), None) is None
    finally:
        monkeypatch.delenv("MODELC_ONEDNN_LINEAR")
        onednn_linear_supported.cache_clear()
    assert cpu_linear(torch.zeros(1024, 1024), None) is not None


@pytest.mark.parametrize(("variant", "tp"), [("rw", 1), ("7b", 1), ("40b", 1), ("40b", 2)])
def test_greedy_matches_transformers_with_onednn_everywhere(
    registry, variant, tp, monkeypatch, engine_dir, hf_model, prompt_ids
):
    """The tiny test models' weights are below the size threshold; lowering them all to oneDNN
    checks the fast path end to end (bias, ALiBi, MQA, GQA, tensor-parallel ranks as threads)
    against transformers."""
    from compiler_core.build.engine import engine_mapping, load_rank_session, read_engine_config
    from compiler_core.runtime.runner import LocalRunner

    monkeypatch.setattr(cpu_linear_module, "MIN_ONEDNN_WEIGHT_ELEMENTS", 0)
    # Recorded through a wrapper rather than the profiler, which does not see the rank threads.
    onednn_weights = set()
    inner_product = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        onednn_weights.add(args[1].data_ptr())
        return inner_product(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    path = engine_dir(variant, tp)
    config = read_engine_config(path)
    mapping = engine_mapping(config)
    runner = LocalRunner([load_rank_session(registry, path, r, "cpu", config) for r in mapping.ranks()], mapping)
    end_id, _ = special_ids(config)
    settings = GenerationConfig(16, end_id=end_id, pad_id=0)
    ours = [beams[0] for beams in generate(runner, prompt_ids, settings)]
    for session in runner.sessions:  # every linear of every rank ran through oneDNN
        executor = session.executor
        linears = {executor.weights[n.params["weight"]].data_ptr() for n in executor.graph.nodes_of("linear")}
        assert linears and linears <= onednn_weights
    ref = hf_generate(hf_model(variant), prompt_ids, 0, max_new_tokens=16, do_sample=False)
    assert [strip_padding(row, len(seq), {0}) for row, seq in zip(ref, ours, strict=True)] == ours
