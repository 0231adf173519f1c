"""bench/gpu_tune.py runs end to end on a CPU with tiny shapes under Triton's interpreter (nothing is timed).

A real subprocess, as the lead runs it on the GPU: every (kernel, linear, M) gets a checked best
configuration, the prefill comparison runs, and the suggested table is printed. A configuration
that fails (here one the INT4 GEMM rejects) is skipped, not fatal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler_core.testing import use_triton_interpreter

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_tune_runs_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "tune.json"
    args = [sys.executable, str(BENCH / "gpu_tune.py"), "--device", "cpu", "--tiny", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {(r["kernel"], r["m"]) for r in result["rows"]} == {(k, m) for k in ("int4", "fp8") for m in (1, 3)}
    assert all(r["best"] is not None for r in result["rows"]), result["rows"]
    # Each row lists its search: the winner among the candidates, every candidate a time or a reason.
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_tune

    from compiler_core.backends.torch.cuda.tiling import Config

    for row in result["rows"]:
        best = gpu_tune.config_literal(Config(**row["best"]))
        assert best in row["tried"] and isinstance(row["tried"][best], float), row
        assert len(row["tried"]) > 1 and all(isinstance(v, float | str) for v in row["tried"].values())
    assert len(result["prefill"]) == 4 and all(isinstance(r["int4 dequant + cuBLAS"], float) for r in result["prefill"])
    assert "TABLE = {" in proc.stdout and result["suggested_table"] in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter form of the check")
def test_failing_configs_are_skipped(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_tune

    from compiler_core.backends.torch.cuda.tiling import Config

    use_triton_interpreter()
    linear = gpu_tune.Linear("qkv", 24, 80, 32, torch.device("cpu"), 1)
    sweep = gpu_tune.Sweep(timing=False)
    assert sweep.measure(linear, "int4", 2, Config(16, 32, 48, 1, 4, 1)) is None  # 48: not a power of two
    assert sweep.measure(linear, "int4", 2, Config(16, 32, 64, 1, 4, 1)) == 0.0
    assert sweep.skipped == 1
