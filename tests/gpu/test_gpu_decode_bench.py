"""bench/gpu_decode.py runs end to end on a CPU with a tiny shape (CI exercises it; nothing is timed).

A real subprocess, as a user runs it: every side builds and generates, the JSON holds a decode
row per batch and a prefill row for each side, and the printed table names every side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_decode.py"
SIDES = ("bf16", "fp8_kv", "int4_awq", "int4_awq_no_triton", "hf_eager")


def test_gpu_decode_runs_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    args = ["--device", "cpu", "--shape", "overhead", "--sides", ",".join(SIDES), "--batch", "1,2"]
    args += ["--new_tokens", "3", "--repeat", "1", "--prefill_len", "8,16", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [row["side"] for row in result["rows"]] == list(SIDES)
    for row in result["rows"]:
        assert "error" not in row, row
        assert set(row["decode"]) == {"1", "2"}  # JSON keys of the batch sizes
        assert set(row["prefill"]) == {"8", "16"}  # one timing per prompt length
        assert all(p["ms"] > 0 and p["first_ms"] > 0 for p in row["prefill"].values())
        assert row["weight_bytes"] > 0
    assert all(f"| {side} |" in proc.stdout for side in SIDES)
    assert "prefill 8 ms" in proc.stdout and "prefill 16 ms" in proc.stdout


def test_gpu_decode_rejects_a_bad_prompt_length():
    args = ["--device", "cpu", "--shape", "tiny", "--prefill_len", "128,abc"]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "--prefill_len" in proc.stderr and "'128,abc'" in proc.stderr and "Traceback" not in proc.stderr


MODES = {"step": ["--steps", "2", "--prompt_len", "8"], "prefill": ["--prefill_len", "24"]}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_profile_step_runs_on_cpu(tmp_path, mode):
    """bench/profile_step.py (it shares gpu_decode's model and sides) lists each side's ops of a decode
    step, or of a prompt pass with ``--prefill_len``."""
    out = tmp_path / "profile.json"
    args = ["--device", "cpu", "--shape", "overhead", "--sides", "bf16,int4_awq", *mode]
    args += ["--top", "3", "--json", str(out)]
    script = BENCH.with_name("profile_step.py")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "overhead" and set(result["sides"]) == {"bf16", "int4_awq"}
    for side in result["sides"].values():
        assert side["launches_per_step"] > 0 and side["wall_ms_per_step"] > 0
        assert any("linear" in k["kernel"] for k in side["kernels"])  # a decode step's matrix products
    assert result["prefill_len"] == (24 if "--prefill_len" in mode else 0)
    what = "per prompt pass" if "--prefill_len" in mode else "per step"
    assert "## bf16:" in proc.stdout and "## int4_awq:" in proc.stdout and what in proc.stdout
