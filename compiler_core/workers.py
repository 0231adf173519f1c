"""Jobs run in spawned worker processes that never outlive the command that started them."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from compiler_core.errors import ModelcError
from compiler_core.interrupts import signals_deferred
from compiler_core.progress import progress

R = TypeVar("R")

#: How long a terminated worker gets to exit before it is killed.
STOP_GRACE_S = 5.0
#: prctl option: the signal this process gets when its parent dies (<linux/prctl.h>).
PR_SET_PDEATHSIG = 1


def map_in_processes(
    function: Callable[..., R],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    *,
    desc: str,
    unit: str,
    show_progress: bool = True,
) -> list[R]:
    """``[function(*job) for job in jobs]``, computed in up to ``workers`` spawned processes.

    When this process stops early (an error in any job, SIGINT, SIGTERM), every worker is
    terminated and reaped before the exception goes on, so none is left running or writing into
    a directory that is about to be removed. Workers ignore SIGINT: a Ctrl-C reaches the whole
    process group, and this process alone decides what happens. On Linux a worker also dies with
    this process when it is killed outright (SIGKILL), which leaves no chance to stop anything.
    """
    started_before = set(multiprocessing.active_children())
    # spawn, not fork: fork is unsafe once torch has started its threads or holds mapped weights.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=context, initializer=_worker_setup, initargs=(os.getpid(),)
    )
    try:
        with _spawned_ignoring_sigint():
            futures = [pool.submit(function, *job) for job in jobs]
        done = concurrent.futures.as_completed(futures)
        for future in progress(done, total=len(futures), desc=desc, unit=unit, enable=show_progress):
            future.result()
        return [future.result() for future in futures]
    except BrokenProcessPool:
        _stop(pool, started_before)
        raise ModelcError(
            "a worker process ended unexpectedly (killed, or out of memory?); rerun with --workers 1 to see more"
        ) from None
    except BaseException:
        _stop(pool, started_before)
        raise
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def _spawned_ignoring_sigint() -> Iterator[None]:
    """Processes spawned inside start with SIGINT ignored.

    An ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt
    handler of its own, so a Ctrl-C that reaches a worker while its interpreter is still starting
    (before ``_worker_setup`` runs) cannot print a traceback from it. The pool spawns its workers
    in ``submit``; a Ctrl-C in those few milliseconds is lost rather than half-handled.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_setup(parent_pid: int) -> None:
    """Runs first in each worker: SIGINT is the parent's to handle, and the parent's death is this one's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the parent died before the request above took effect
            os._exit(1)


def _stop(pool: concurrent.futures.ProcessPoolExecutor, started_before: set[multiprocessing.Process]) -> None:
    """Cancel what has not started and end the pool's worker processes (those started since ``started_before``)."""
    with signals_deferred():
        pool.shutdown(wait=False, cancel_futures=True)
        workers = [p for p in multiprocessing.active_children() if p not in started_before]
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
