"""Running the app under uvicorn on a listening socket, with the shutdown that serving needs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator

import click
import uvicorn

from compiler_core.errors import ModelcError
from compiler_core.serve.app import build_app
from compiler_core.serve.protocol import ServedModel
from compiler_core.serve.scheduler import Scheduler
from compiler_core.serve.slots import SlotRunner

#: How often (s) a thread holding the GIL hands it over to another that waits for it.
GIL_SWITCH_INTERVAL_S = 0.0005


class DrainingServer(uvicorn.Server):
    """uvicorn's server over a scheduler, stopped by SIGTERM/SIGINT (see :meth:`stopping_on_signals`)
    or by the engine failing.

    The first signal drains the scheduler (running requests finish within ``shutdown_timeout``)
    and stops accepting; a second aborts at once. uvicorn's own handler would re-raise the
    signal after shutting down, which ends the process with the signal's status instead of 0; and
    it is installed only once the loop runs, after the ready line.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.shutdown_timeout = shutdown_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # see stopping_on_signals

    @contextlib.contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.should_exit:
            self.force_exit = True
            self.scheduler.drain(0.0)
        else:
            self.scheduler.drain(self.shutdown_timeout)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.scheduler.failure is not None


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
    # The engine thread and the event loop share the GIL. At Python's default 5 ms switch interval a
    # decode step's tokens wait for the engine thread's time slice to run out before the loop can
    # send them; 0.5 ms cut the inter-token latency by a third on the CPU benchmark.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    scheduler = Scheduler(slots, model.max_seq_len, prefill_chunk, max_queue)
    config = uvicorn.Config(
        build_app(model, scheduler, api_key),
        log_level="warning",
        lifespan="off",
        # uvicorn cancels what still runs shortly after the scheduler has aborted it.
        timeout_graceful_shutdown=int(shutdown_timeout) + 2,
    )
    server = DrainingServer(config, scheduler, shutdown_timeout)
    scheduler.start()
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    try:
        with server.stopping_on_signals():
            click.echo(f"modelc: serving {model.name} on http://{shown}:{port} ({slots.rows} slots)")
            asyncio.run(server.serve(sockets=[listener]))
    finally:
        scheduler.drain(0.0)
        scheduler.join()
    if scheduler.failure is not None:
        raise ModelcError(f"the engine failed: {type(scheduler.failure).__name__}: {scheduler.failure}")
