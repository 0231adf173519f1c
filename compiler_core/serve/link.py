"""The link between the engine process and the HTTP frontend process: one duplex pipe.

The server runs in two processes because they would otherwise share one GIL. The engine thread
needs the interpreter for a short while at exact moments (to queue the next decode step as soon as
the GPU takes the last one); the event loop needs it for every token of every stream (text,
JSON, a socket write). Measured on an H200 before the split (7B shape, 32 streams), a server
iteration took 8 ms against the scheduler's 5 ms alone, and 10 ms against 0.44 ms on a small model:
the GPU waited on the loop. Apart, the engine process only steps and the frontend only serves.

Messages (pickled tuples):

frontend -> engine
    ``("ready", None)``                           the frontend accepts connections
    ``("submit", [(id, prompt, params), ...])``   sequences to queue, all or none
    ``("cancel", [id, ...])``                     free these slots (the client went away)
engine -> frontend
    ``("events", [(id, Token | Finished), ...], stats)``   one engine iteration's events, in order
    ``("failed", message)``                       the engine failed (its sequences ended already)
    ``("drain", force)``                          stop accepting; ``force``: abort open responses

The frontend bounds the queue itself (it knows every sequence it submitted and which have
finished), so a submit needs no answer: a sequence the engine still refuses (it began draining
while the submit was on its way) ends with ``Finished("abort")``, as shutdown ends others.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from compiler_core.serve.scheduler import Finished, NotAccepting, QueueFull, Scheduler, Sequence, Token

#: With no events to send, the engine still sends its stats this often (s), for /health.
STATS_INTERVAL_S = 0.05


class EngineEndpoint:
    """The engine process's end: runs the frontend's submits and cancels on ``scheduler`` and sends
    back each iteration's events in one message (a step hook of the scheduler)."""

    def __init__(self, scheduler: Scheduler, conn: Connection) -> None:
        self.scheduler = scheduler
        self.conn = conn
        self._live: dict[int, Sequence] = {}
        self._pending: list[tuple[int, Token | Finished]] = []
        self._send_lock = threading.Lock()
        self._last_sent = 0.0
        self._closed = False
        self._failure_sent = False
        #: Set once the frontend accepts connections.
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="modelc-link", daemon=True)
        scheduler.add_step_hook(self.flush)

    def start(self) -> None:
        self._reader.start()

    def flush(self) -> None:
        """Send what the sinks collected, with the scheduler's stats (on the engine thread)."""
        now = time.monotonic()
        if not self._pending and now - self._last_sent < STATS_INTERVAL_S:
            return
        events, self._pending = self._pending, []
        self._last_sent = now
        self.send("events", events, self.scheduler.stats())
        failure = self.scheduler.failure
        if failure is not None and not self._failure_sent:
            self._failure_sent = True
            self.send("failed", f"{type(failure).__name__}: {failure}")

    def send(self, *message: Any) -> None:
        """Send one message; a frontend that has gone away is not an error here (the server's main
        loop sees its exit)."""
        with self._send_lock:
            if self._closed:
                return
            try:
                self.conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                self._closed = True

    def _sink(self, sid: int) -> Callable[[Token | Finished], None]:
        def post(event: Token | Finished) -> None:  # on the engine thread
            self._pending.append((sid, event))
            if type(event) is Finished:
                self._live.pop(sid, None)

        return post

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                return  # the frontend has exited; the server's main loop winds the engine down
            if kind == "submit":
                self._submit(payload)
            elif kind == "ready":
                self.ready.set()
            elif kind == "cancel":
                self.scheduler.cancel([seq for seq in map(self._live.get, payload) if seq is not None])

    def _submit(self, items: list[tuple[int, list[int], Any]]) -> None:
        sequences = {sid: Sequence(prompt, params, self._sink(sid)) for sid, prompt, params in items}
        self._live.update(sequences)
        try:
            self.scheduler.submit(list(sequences.values()))
        except (QueueFull, NotAccepting):
            # Refused before the scheduler saw them (it began draining meanwhile): they end here, in
            # a message of their own, since no iteration will flush them.
            for sid in sequences:
                self._live.pop(sid, None)
            self.send("events", [(sid, Finished("abort")) for sid in sequences], self.scheduler.stats())


class EngineClient:
    """The frontend's stand-in for the :class:`Scheduler`: what the ASGI app calls (``submit``,
    ``cancel``, ``stats``, ``accepting``, ``failure``, ``add_step_hook``), carried over the link.

    Runs on the event loop's thread: :meth:`attach` reads the link from the loop, calls each event's
    sink and then the step hooks, once per engine iteration.
    """

    def __init__(self, conn: Connection, slots: int, max_queue: int) -> None:
        self.conn = conn
        self.slots = slots
        self.max_queue = max_queue
        #: Why the engine failed (or went away); None while it runs.
        self.failure: str | None = None
        self._accepting = True
        self._stats: dict[str, int | float] = {"slots": slots, "busy": 0, "waiting": 0, "generated": 0}
        self._sequences: dict[int, Sequence] = {}
        self._ids: dict[Sequence, int] = {}  # each open sequence's id on the link
        self._next_id = 0
        self._step_hooks: tuple[Callable[[], None], ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called with ``force`` when the frontend is to stop: the engine process asks it to, or failed.
        self.on_drain: Callable[[bool], None] = lambda force: None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the link on ``loop`` from now on (the loop the app runs on)."""
        self._loop = loop
        loop.add_reader(self.conn.fileno(), self.receive)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.failure is None

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        self._step_hooks = (*self._step_hooks, hook)

    def stats(self) -> dict[str, int | float]:
        """The engine's stats as of its last message, with ``waiting`` counting the sequences on
        their way to it too."""
        waiting = max(int(self._stats["waiting"]), len(self._sequences) - self.slots)
        return {**self._stats, "waiting": waiting}

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue ``sequences`` (all or none); raises QueueFull or NotAccepting, as the scheduler does."""
        if not self.accepting:
            raise NotAccepting("the server is shutting down" if self.failure is None else "the engine failed")
        waiting = len(self._sequences) - self.slots
        if waiting + len(sequences) > self.max_queue:
            raise QueueFull(f"{max(waiting, 0)} sequences are waiting already (--max_queue {self.max_queue})")
        items = []
        for seq in sequences:
            sid, self._next_id = self._next_id, self._next_id + 1
            self._sequences[sid] = seq
            self._ids[seq] = sid
            items.append((sid, seq.prompt, seq.params))
        self._send("submit", items)

    def cancel(self, sequences: list[Sequence]) -> None:
        sids = [self._ids[seq] for seq in sequences if seq in self._ids]
        for seq in sequences:
            seq.cancelled = True
        if sids:
            self._send("cancel", sids)

    def _send(self, *message: Any) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._lost()

    def receive(self) -> None:
        """Handle every message waiting on the link (the loop calls this when it is readable)."""
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            _, events, stats = message
            self._stats = stats
            for sid, event in events:
                seq = self._sequences.get(sid)
                if seq is None:
                    continue
                if type(event) is Finished:
                    del self._sequences[sid]
                    del self._ids[seq]
                seq.sink(event)
            for hook in self._step_hooks:
                hook()
        elif kind == "failed":
            if self.failure is None:
                self.failure = message[1]
                self.on_drain(False)  # the engine ended every sequence already: let the answers go out
        elif kind == "drain":
            self._accepting = False
            self.on_drain(message[1])

    def _lost(self) -> None:
        """The engine process went away: every open sequence ends with an error."""
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None
        if self.failure is None:
            self.failure = "the engine process exited"
        for seq in list(self._sequences.values()):
            seq.sink(Finished("error"))
        self._sequences.clear()
        self._ids.clear()
        for hook in self._step_hooks:
            hook()
        self.on_drain(True)
