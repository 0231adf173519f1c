"""Running the app under uvicorn on a listening socket, with the shutdown that serving needs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

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
    # The engine thread and the event loop share the GIL: a thread that wants it waits for the
    # holder to block or for the switch interval to pass. With a token per request per event, at
    # Python's default 5 ms the loop's sends waited on the engine's time slices (0.5 ms cut the
    # inter-token latency by a third). With one hand-off per step and one send per stream the
    # loop holds the GIL less and the setting matters less: on the 2-core VM, 32 clients of the
    # overhead shape, served/offline was 0.61 and 0.65 at 0.5 ms, 0.59 and 0.65 at 1 ms, 0.59 and
    # 0.49 at 5 ms, 0.58 and 0.49 at 0.2 ms (noisy; 0.5 ms is never worse).
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
            _run(server.serve(sockets=[listener]), config)
    finally:
        scheduler.drain(0.0)
        scheduler.join()
    if scheduler.failure is not None:
        raise ModelcError(f"the engine failed: {type(scheduler.failure).__name__}: {scheduler.failure}")


def _run(main: Coroutine[Any, Any, None], config: uvicorn.Config) -> None:
    """Run ``main`` on the event loop uvicorn picks (uvloop when installed), as ``uvicorn.run`` does.

    asyncio.run alone gave the default loop, not the uvloop that the docs' benchmark lists: the
    server now runs on what ``uvicorn.run`` would run it on. (Its effect on the CPU benchmark was
    within the VM's noise, a few per cent.)"""
    factory = config.get_loop_factory() if hasattr(config, "get_loop_factory") else None
    if factory is None or sys.version_info < (3, 11):
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
