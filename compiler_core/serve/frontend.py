"""The HTTP frontend process: uvicorn and the ASGI app, over an :class:`EngineClient`.

Started by the engine process (server.py) with the listening socket and its end of the link. It
ignores SIGINT and SIGTERM: the engine process decides when serving ends and says so on the link
(a Ctrl-C in a terminal reaches both processes, and must drain, not kill, this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Coroutine, Iterator
from multiprocessing.connection import Connection
from typing import Any

import uvicorn

from compiler_core.serve.app import build_app
from compiler_core.serve.link import EngineClient
from compiler_core.serve.protocol import ServedModel


class FrontendServer(uvicorn.Server):
    """uvicorn's server, stopped by the engine process through the link instead of by signals.

    A drain stops accepting connections and lets the open responses end (the engine finishes or
    aborts their sequences); a forced one closes them at once.
    """

    def __init__(self, config: uvicorn.Config, client: EngineClient) -> None:
        super().__init__(config)
        self.client = client
        client.on_drain = self._drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # signals are the engine process's business

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.client.attach(asyncio.get_running_loop())
            self.client.conn.send(("ready", None))

    def _drain(self, force: bool) -> None:
        self.should_exit = True
        self.force_exit = self.force_exit or force


def run_frontend(
    conn: Connection,
    listener: socket.socket,
    model: ServedModel,
    api_key: str | None,
    slots: int,
    max_queue: int,
    shutdown_timeout: float,
) -> None:
    """Serve HTTP on ``listener`` until the engine process says to stop (the frontend process's main)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    client = EngineClient(conn, slots, max_queue)
    config = uvicorn.Config(
        build_app(model, client, api_key),
        log_level="warning",
        lifespan="off",
        # uvicorn cancels what still runs shortly after the engine has aborted it.
        timeout_graceful_shutdown=int(shutdown_timeout) + 2,
    )
    _run(FrontendServer(config, client).serve(sockets=[listener]), config)


def _run(main: Coroutine[Any, Any, None], config: uvicorn.Config) -> None:
    """Run ``main`` on the event loop uvicorn picks (uvloop when installed), as ``uvicorn.run`` does."""
    factory = config.get_loop_factory() if hasattr(config, "get_loop_factory") else None
    if factory is None or sys.version_info < (3, 11):
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
