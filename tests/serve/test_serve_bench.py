"""bench/serve_load.py runs end to end on a CPU with a tiny engine (nothing timed is asserted):
the real server under real clients, every request answered with all its tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"


def test_serve_load_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "serve.json"
    command = [sys.executable, str(BENCH), "--shape", "overhead", "--clients", "4", "--requests", "2"]
    command += ["--prompt_len", "8", "--output_len", "6", "--repeat", "1", "--work_dir", str(tmp_path)]
    done = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["error_count"] == 0 and result["errors"] == []
    assert result["output_tokens"] == 4 * 2 * 6  # ignore_eos: every request runs to its budget
    assert result["scheduler_iterations"]["count"] >= 6  # one prefill, then a step per further token
    assert result["served_vs_offline"] == pytest.approx(result["aggregate_tps"] / result["offline_tps"])
    assert result["served_vs_offline"] > 0
    assert result["decode_steps"] > 0 and result["graph_steps"] == 0  # no CUDA graphs on a CPU
    assert result["engine_iterations"] >= result["decode_steps"] / 2  # a decode step per iteration, at most
    assert 0 < result["engine_busy"] <= 1
    assert "served / offline" in done.stdout
