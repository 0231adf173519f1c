"""examples/demo.sh, the README's main job: tiny Falcon -> convert -> build -> run -> summarize, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_demo_runs_end_to_end(tmp_path):
    bin_dir = Path(sys.executable).parent  # the environment's `modelc` script lives beside its python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "demo.sh"), str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5", "Done."):
        assert step in proc.stdout
    run = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert len(run["output_ids"]) == 2 and all(len(ids) > 0 for ids in run["output_ids"])
    scores = json.loads((tmp_path / "demo" / "summarize.json").read_text())
    # Same weights, same prompts, greedy: the engine's summaries are transformers' summaries.
    assert scores["engine_vs_hf"]["rouge1"] == pytest.approx(100.0)
    assert {"engine", "hf"} <= set(scores)
