"""Outputs are never destructive (issue 15): refused output directories, SIGINT / SIGTERM mid-run,
workers that die, and runs racing into one output directory.

The CLI cases run ``python -m compiler_core`` in a real subprocess, as a user does, and send it
real signals; each checks the exit code, the one ``modelc: error:`` line naming the culprit, that
nothing was lost (every file hashed before and after) and that nothing was left behind (no
temporary directory beside the output, no worker process still running).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from compiler_core.build.engine import build_engine, choose_backend
from compiler_core.convert.from_hf import convert
from compiler_core.errors import ConcurrentWriteError, UsageError
from compiler_core.formats.checkpoint import read_config
from compiler_core.formats.fileio import OutputKind, atomic_output_dir
from compiler_core.interrupts import Interrupted, interrupts_raised, signals_deferred
from compiler_core.testing import error_lines, run_modelc

# --- helpers --------------------------------------------------------------------------------


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def left_beside(directory: Path) -> list[str]:
    """Temporary or backup directories of ``directory`` still beside it."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


def assert_one_error(result_stderr: str, *words: str) -> None:
    lines = error_lines(result_stderr)
    assert len(lines) == 1, result_stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result_stderr, result_stderr


class Modelc:
    """``python -m compiler_core ARGS`` running in the background, in its own process group, with its
    stderr collected as it arrives (progress bars included)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "compiler_core", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.process.stderr.read(1):
            self.stderr += chunk

    def workers(self) -> list[psutil.Process]:
        """Its spawned multiprocessing workers."""
        found = []
        for child in psutil.Process(self.process.pid).children():
            with _gone_is_fine():
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def wait_until(self, condition: Callable[[], object], timeout: float = 180) -> object:
        """Poll ``condition`` until it is truthy (and return it); fail if the command ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"modelc ended (exit {self.process.returncode}) before the moment to test:\n{self.stderr}")
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        pytest.fail(f"timed out waiting:\n{self.stderr}")

    def finish(self, timeout: float = 180) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code


class _gone_is_fine:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, psutil.NoSuchProcess)


def running(processes: list[psutil.Process]) -> list[int]:
    """The pids among ``processes`` that still run (a zombie has ended)."""
    alive = []
    for process in processes:
        with _gone_is_fine():
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
    return alive


def temp_dirs(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


@pytest.fixture
def checkpoint(tmp_path, falcon_checkpoint_tp2) -> Path:
    """An earlier convert output (tp=2) that a new run may replace; a private copy."""
    return Path(shutil.copytree(falcon_checkpoint_tp2, tmp_path / "ckpt"))


@pytest.fixture
def engine(tmp_path, checkpoint) -> Path:
    """An earlier build output of ``checkpoint``."""
    backend, _ = choose_backend("torch")
    build_engine(checkpoint, tmp_path / "engine", backend, {}, show_progress=False)
    return tmp_path / "engine"


@pytest.fixture
def hf_copy(tmp_path, tiny_falcon) -> Path:
    """A private copy of the tiny Hugging Face model (tests here may try to destroy it)."""
    return Path(shutil.copytree(tiny_falcon, tmp_path / "models" / "falcon"))


# --- refused output directories, through the CLI --------------------------------------------


def _unrelated_files(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("precious")
    (home / "notes.txt").write_text("also precious")
    return home


REFUSALS = {
    "convert into unrelated files": (
        lambda t, hf, ck, en: ("convert", "--model_dir", hf, "--output_dir", _unrelated_files(t)),
        "is not empty and is not an earlier modelc checkpoint",
    ),
    "convert into its own model dir": (
        lambda t, hf, ck, en: ("convert", "--model_dir", hf, "--output_dir", hf),
        "is the input",
    ),
    "build into its own checkpoint": (
        lambda t, hf, ck, en: ("build", "--checkpoint_dir", ck, "--output_dir", ck, "--backend", "torch"),
        "is the input",
    ),
    "quantize into another Hugging Face model": (
        lambda t, hf, ck, en: (
            "quantize",
            "--model_dir",
            t / "models-src",
            "--output_dir",
            hf,
            "--qformat",
            "int4_awq",
        ),
        "holds a Hugging Face model",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_output_dir_loses_nothing(case, tmp_path, hf_copy, checkpoint, engine, tiny_falcon):
    shutil.copytree(tiny_falcon, tmp_path / "models-src")  # a second model, for the cases that need one
    command, words = REFUSALS[case]
    args = command(tmp_path, hf_copy, checkpoint, engine)
    output = Path(args[args.index("--output_dir") + 1])
    before = {d: digest(d) for d in (tmp_path / "models-src", hf_copy, checkpoint, engine, output)}

    result = run_modelc(*map(str, args))

    assert result.returncode == 2, result.stderr
    assert_one_error(result.stderr, str(output), words)
    assert "calibrat" not in result.stderr  # quantize refuses before it calibrates
    assert {d: digest(d) for d in before} == before
    assert left_beside(output) == []


def test_refusals_in_process(tmp_path, hf_copy, checkpoint, engine, tiny_falcon):
    before = {d: digest(d) for d in (hf_copy, checkpoint, engine)}
    with pytest.raises(UsageError, match=r"models: contains the input .*falcon; choose another output directory"):
        convert(hf_copy, hf_copy.parent, show_progress=False)
    with pytest.raises(UsageError, match=r"falcon: holds a Hugging Face model \(model_type 'falcon'\) and is not an"):
        convert(tiny_falcon, hf_copy, show_progress=False)
    with pytest.raises(
        UsageError, match="engine: holds a modelc-engine output and is not an earlier modelc checkpoint"
    ):
        convert(hf_copy, engine, show_progress=False)
    assert {d: digest(d) for d in before} == before
    backend, _ = choose_backend("torch")
    other = Path(shutil.copytree(checkpoint, tmp_path / "other-ckpt"))
    with pytest.raises(UsageError, match="holds a modelc-checkpoint output and is not an earlier modelc engine"):
        build_engine(checkpoint, other, backend, {}, show_progress=False)
    link = tmp_path / "link"
    link.symlink_to(checkpoint, target_is_directory=True)
    with pytest.raises(UsageError, match=r"link: is a symbolic link"):
        convert(hf_copy, link, show_progress=False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match=r"a-file/out: cannot create its parent directory"):
        convert(hf_copy, tmp_path / "a-file" / "out", show_progress=False)
    with pytest.raises(UsageError, match=r"a-file: exists and is not a directory"):
        convert(hf_copy, tmp_path / "a-file", show_progress=False)
    assert (tmp_path / "a-file").read_text() == "x"
    assert digest(other) == digest(checkpoint)


def test_quantize_never_replaces_a_dir_holding_its_calibration_text(tmp_path, hf_copy, checkpoint):
    from compiler_core.quantize.ptq import quantize

    text = checkpoint / "calibration.txt"
    text.write_text("The river ran slowly past the old mill.\n\nLight came through the trees.\n")
    before = digest(checkpoint)
    with pytest.raises(UsageError, match=r"ckpt: contains the input .*calibration\.txt"):
        quantize(hf_copy, checkpoint, qformat="int4_awq", calib_dataset=text, calib_size=2, show_progress=False)
    assert digest(checkpoint) == before


def test_tiny_falcon_replaces_only_an_earlier_tiny_falcon(tmp_path, tokenizer, hf_copy):
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    made = make_tiny_falcon(tmp_path / "tiny", "rw", num_layers=1, tokenizer=tokenizer, seed=1)
    first = digest(made)
    make_tiny_falcon(made, "rw", num_layers=1, tokenizer=tokenizer, seed=2)
    assert digest(made) != first and left_beside(made) == []

    config = json.loads((hf_copy / "config.json").read_text())
    del config["modelc_output"]  # now a model that modelc did not make
    (hf_copy / "config.json").write_text(json.dumps(config))
    before = digest(hf_copy)
    with pytest.raises(UsageError, match=r"holds a Hugging Face model .* not an earlier tiny Falcon"):
        make_tiny_falcon(hf_copy, "rw", num_layers=1, tokenizer=tokenizer)
    assert digest(hf_copy) == before


def test_build_replaces_an_earlier_engine(tmp_path, checkpoint, engine):
    (engine / "stale.txt").write_text("from an older build")
    backend, _ = choose_backend("torch")
    build_engine(checkpoint, engine, backend, {"max_batch_size": 3}, show_progress=False)
    assert not (engine / "stale.txt").exists()
    assert json.loads((engine / "config.json").read_text())["build"]["max_batch_size"] == 3
    assert left_beside(engine) == []


# --- races ----------------------------------------------------------------------------------

KIND = OutputKind("test output", "test-output")


def test_a_run_finishing_first_keeps_its_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ConcurrentWriteError, match=r"out: another run wrote this directory"):
        with atomic_output_dir(target, KIND) as slow:
            (slow / "config.json").write_text('{"format": "test-output", "run": "slow"}')
            with atomic_output_dir(target, KIND) as fast:
                (fast / "config.json").write_text('{"format": "test-output", "run": "fast"}')
    assert (target / "config.json").read_text() == '{"format": "test-output", "run": "fast"}'
    assert left_beside(target) == []


def flock_waiters(directory: Path) -> int:
    """Processes blocked on an flock of ``directory`` (the swap lock), from the kernel's /proc/locks."""
    inode = f":{os.stat(directory).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "-> FLOCK" in line and inode in line)


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux /proc/locks to see runs waiting")
def test_runs_finishing_at_the_same_moment_leave_one_complete_output(tmp_path, tiny_falcon):
    """Two converts are held at their final swap (the test holds the lock they take) and then let go at once."""
    out = tmp_path / "out"
    held = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = {
            dtype: Modelc("convert", "--model_dir", tiny_falcon, "--output_dir", out, "--dtype", dtype)
            for dtype in ("float16", "bfloat16")
        }
        for run in runs.values():
            run.wait_until(lambda: flock_waiters(tmp_path) == 2)
    finally:
        os.close(held)
    codes = {dtype: run.finish() for dtype, run in runs.items()}

    assert sorted(codes.values()) == [0, 1], {d: r.stderr for d, r in runs.items()}
    (winner,) = (d for d, code in codes.items() if code == 0)
    (loser,) = (d for d, code in codes.items() if code == 1)
    assert_one_error(runs[loser].stderr, str(out), "another run wrote this directory")
    assert read_config(out).dtype == winner  # complete: every rank file its mapping names is there
    assert left_beside(out) == []


# --- signals in this process ----------------------------------------------------------------


def test_a_signal_is_held_over_a_deferred_block_then_raised():
    reached_the_end = False
    with interrupts_raised(), pytest.raises(Interrupted) as caught:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # a signal handler would have run by now
            reached_the_end = True
    assert reached_the_end
    assert (caught.value.exit_code, str(caught.value)) == (143, "interrupted by SIGTERM")


def test_a_repeated_signal_does_not_interrupt_the_cleanup_of_the_first():
    cleaned_up = False
    with interrupts_raised(), pytest.raises(Interrupted) as caught:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted long before this ends
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # impatient Ctrl-C during the cleanup
            time.sleep(0.2)
            cleaned_up = True
    assert cleaned_up and caught.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# --- signals and dying workers --------------------------------------------------------------


def test_sigterm_during_convert_stops_workers_and_keeps_the_old_output(tiny_falcon, checkpoint):
    before = digest(checkpoint)
    run = Modelc(
        "convert", "--model_dir", tiny_falcon, "--output_dir", checkpoint, "--tp_size", "2", "--workers", "2",
        "--dtype", "float16",
    )  # fmt: skip
    workers = run.wait_until(lambda: temp_dirs(checkpoint) and len(run.workers()) == 2 and run.workers())
    run.process.send_signal(signal.SIGTERM)

    assert run.finish() == 143, run.stderr
    assert running(workers) == [], "worker processes outlived the command"
    assert_one_error(run.stderr, "interrupted by SIGTERM")
    assert digest(checkpoint) == before
    assert left_beside(checkpoint) == []


def test_ctrl_c_during_build_stops_workers_and_keeps_the_old_engine(checkpoint, engine):
    before = digest(engine)
    run = Modelc(
        "build", "--checkpoint_dir", checkpoint, "--output_dir", engine, "--backend", "torch", "--workers", "2"
    )
    workers = run.wait_until(lambda: temp_dirs(engine) and len(run.workers()) == 2 and run.workers())
    os.killpg(run.process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group

    assert run.finish() == 130, run.stderr
    assert running(workers) == []
    assert_one_error(run.stderr, "interrupted by SIGINT")  # and no KeyboardInterrupt traceback from a worker
    assert digest(engine) == before
    assert left_beside(engine) == []


def test_sigterm_during_quantize_keeps_the_old_output(tiny_falcon, checkpoint):
    before = digest(checkpoint)
    run = Modelc(
        "quantize", "--model_dir", tiny_falcon, "--output_dir", checkpoint, "--qformat", "int4_awq",
        "--calib_size", "16", "--calib_max_seq_length", "64",
    )  # fmt: skip
    run.wait_until(lambda: "awq scales" in run.stderr)  # calibrated, searching scales
    run.process.send_signal(signal.SIGTERM)

    assert run.finish() == 143, run.stderr
    assert_one_error(run.stderr, "interrupted by SIGTERM")
    assert digest(checkpoint) == before
    assert left_beside(checkpoint) == []


def test_a_killed_worker_is_one_error_and_keeps_the_old_output(tiny_falcon, checkpoint):
    before = digest(checkpoint)
    run = Modelc("convert", "--model_dir", tiny_falcon, "--output_dir", checkpoint, "--tp_size", "2", "--workers", "2")
    workers = run.wait_until(lambda: temp_dirs(checkpoint) and len(run.workers()) == 2 and run.workers())
    workers[0].send_signal(signal.SIGKILL)  # as the out-of-memory killer would

    assert run.finish() == 1, run.stderr
    assert_one_error(run.stderr, "a worker process ended unexpectedly")
    assert running(workers) == []
    assert digest(checkpoint) == before
    assert left_beside(checkpoint) == []


def maps_torch(process: psutil.Process) -> bool:
    """True once ``process`` has loaded torch, so it is past its start-up and into its job."""
    with _gone_is_fine():
        return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent through Linux's PR_SET_PDEATHSIG")
def test_workers_die_with_a_killed_command(tiny_falcon, tmp_path):
    run = Modelc(
        "convert", "--model_dir", tiny_falcon, "--output_dir", tmp_path / "out", "--tp_size", "2", "--workers", "2"
    )
    workers = run.wait_until(lambda: len(run.workers()) == 2 and all(map(maps_torch, run.workers())) and run.workers())
    try:
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)  # held mid-job: they cannot finish and leave on their own
        run.process.send_signal(signal.SIGKILL)  # no handler runs, nothing can be stopped on the way out
        assert run.finish() == -signal.SIGKILL
        psutil.wait_procs(workers, timeout=10)
        assert running(workers) == [], "workers outlived a killed command"
    finally:
        for worker in workers:
            with _gone_is_fine():
                worker.kill()
