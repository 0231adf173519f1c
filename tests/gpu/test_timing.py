"""The load-time kernel choice (cuda/timing.py) on a CUDA GPU: it ranks calls by their time from memory."""

from __future__ import annotations

import pytest
import torch

from compiler_core.backends.torch.cuda import timing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graphs: needs a CUDA GPU")


def test_first_is_faster_ranks_a_call_against_twenty_times_its_work():
    a = torch.randn(1024, 1024, device="cuda")
    once = lambda: a @ a  # noqa: E731
    twenty = lambda: [a @ a for _ in range(20)][-1]  # noqa: E731
    assert timing.first_is_faster(once, twenty, a.device)
    assert not timing.first_is_faster(twenty, once, a.device)


def test_each_timed_call_follows_an_l2_flush(monkeypatch):
    """The graph replays a write of twice the L2 before every call, so no weight is timed warm."""
    seen = []
    real = timing._graph_seconds

    def recording(fn, flush):
        seen.append((flush.numel(), flush.device))
        return real(fn, flush)

    monkeypatch.setattr(timing, "_graph_seconds", recording)
    x = torch.randn(256, device="cuda")
    assert timing.graph_seconds(lambda: x * 2, x.device) > 0
    assert seen == [(2 * torch.cuda.get_device_properties(x.device).L2_cache_size, x.device)]
