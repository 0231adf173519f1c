"""Serving in two processes: this one steps the engine, a child runs the HTTP frontend.

:func:`serve` starts the scheduler's engine thread here and the frontend (frontend.py) in a
spawned process, joined by the link of link.py; see there for why they are apart. This process
owns the signals: the first SIGTERM/SIGINT stops the frontend accepting and lets running requests
finish within ``shutdown_timeout`` (the engine aborts what is left after that), a second aborts at
once; serving ends when the frontend has sent its last answer and exited.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import socket
import time
from collections.abc import Iterator

import click

from compiler_core.errors import ModelcError
from compiler_core.serve.frontend import run_frontend
from compiler_core.serve.link import EngineEndpoint
from compiler_core.serve.protocol import ServedModel
from compiler_core.serve.scheduler import Scheduler
from compiler_core.serve.slots import SlotRunner

#: Longest the frontend process may take to start (imports, then uvicorn's startup), in seconds.
FRONTEND_START_TIMEOUT_S = 120.0


def serve(
    listener: socket.socket,
    model: ServedModel,
    slots: SlotRunner,
    prefill_chunk: int,
    max_queue: int,
    api_key: str | None,
    shutdown_timeout: float,
) -> None:
    """Serve ``model`` on ``listener`` until a signal; print one line once requests are accepted."""
    # The frontend bounds the queue (link.py); the scheduler's bound only has to hold what it lets through.
    scheduler = Scheduler(slots, model.max_seq_len, prefill_chunk, slots.rows + max_queue)
    ours, theirs = multiprocessing.Pipe(duplex=True)
    endpoint = EngineEndpoint(scheduler, ours)
    # spawn, not fork: this process has CUDA (and maybe MPI) state that a forked child must not inherit.
    frontend = multiprocessing.get_context("spawn").Process(
        target=run_frontend,
        args=(theirs, listener, model, api_key, slots.rows, max_queue, shutdown_timeout),
        name="modelc-http",
        daemon=True,
    )
    stopping = _Stopping(scheduler, endpoint, shutdown_timeout)
    try:
        with stopping.on_signals():
            frontend.start()
            theirs.close()
            slots.warm_up(prefill_chunk)  # while the frontend starts
            scheduler.start()
            endpoint.start()
            if _wait_until_ready(frontend, endpoint, stopping):
                host, port = listener.getsockname()[:2]
                # The frontend has its own descriptor now; with this one open, connections made once
                # it stops accepting would wait in the backlog instead of being refused.
                listener.close()
                shown = f"[{host}]" if ":" in host else host
                click.echo(f"modelc: serving {model.name} on http://{shown}:{port} ({slots.rows} slots)")
                while frontend.is_alive():
                    frontend.join(0.2)
    finally:
        scheduler.drain(0.0)
        scheduler.join()
        if frontend.is_alive():
            frontend.terminate()
            frontend.join(10)
        ours.close()
    if scheduler.failure is not None:
        raise ModelcError(f"the engine failed: {type(scheduler.failure).__name__}: {scheduler.failure}")
    if frontend.exitcode != 0 and not stopping.signalled:
        raise ModelcError(f"the HTTP frontend exited with status {frontend.exitcode}; its error is above")


def _wait_until_ready(
    frontend: multiprocessing.process.BaseProcess, endpoint: EngineEndpoint, stopping: _Stopping
) -> bool:
    """True once the frontend accepts requests; False if a signal stopped it before that."""
    deadline = time.monotonic() + FRONTEND_START_TIMEOUT_S
    while not endpoint.ready.wait(0.2):
        if not frontend.is_alive():
            if stopping.signalled:  # told to stop before it was up: nothing to report
                return False
            raise ModelcError(f"the HTTP frontend exited with status {frontend.exitcode} while starting")
        if time.monotonic() > deadline:
            raise ModelcError(f"the HTTP frontend did not start within {FRONTEND_START_TIMEOUT_S:.0f} s")
    return True


class _Stopping:
    """What SIGTERM and SIGINT do here: drain, then abort on a second signal."""

    def __init__(self, scheduler: Scheduler, endpoint: EngineEndpoint, shutdown_timeout: float) -> None:
        self.scheduler, self.endpoint, self.shutdown_timeout = scheduler, endpoint, shutdown_timeout
        self.signalled = 0

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: object) -> None:
        self.signalled += 1
        force = self.signalled > 1
        self.scheduler.drain(0.0 if force else self.shutdown_timeout)
        self.endpoint.send("drain", force)
