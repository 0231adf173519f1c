"""The ASGI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, and /health.

Handlers run on the event loop. Generation runs in the engine, which ``build_app`` is given as
``scheduler``: in the server an :class:`~compiler_core.serve.link.EngineClient` for the engine's
own process (its events arrive on the loop), or a :class:`Scheduler` with its engine thread in
this process. Either hands over the tokens of each iteration, for all sequences at once
(:class:`_Outbox`); each request takes its events when the loop gets to it, and a stream sends
all it has in one write.
A request whose client goes away (a closed stream, or a disconnect while a non-streamed answer
is pending) cancels its sequences, which frees their slots at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from compiler_core.serve.protocol import (
    GenerationRequest,
    RequestError,
    ServedModel,
    error_body,
    new_id,
    now,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)
from compiler_core.serve.scheduler import Finished, NotAccepting, QueueFull, Scheduler, Sequence, Token
from compiler_core.serve.text import TextStream


class _Outbox:
    """Hands events to the event loop once per engine iteration.

    The sinks, called where the engine's events arrive (a Scheduler's engine thread, or the loop
    itself for an EngineClient), only append to a list; the step hook (:meth:`flush`) passes the
    whole list to the loop in one ``call_soon_threadsafe``, where every generation gets its
    events and its stream is woken once. No lock: only that one thread appends to and swaps the
    list. With an engine thread in this process every wake-up of the loop costs it the GIL for a
    while, so one per step instead of one per token matters.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[_Generation, int, Token | Finished]] = []

    def post(self, generation: _Generation, index: int, event: Token | Finished) -> None:
        self._pending.append((generation, index, event))  # on the engine thread

    def flush(self) -> None:
        """Hand what the sinks collected to the loop (on the engine thread, after each iteration)."""
        if not self._pending:
            return
        items, self._pending = self._pending, []
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop has closed (the server is exiting): nobody is left to read them
            pass


def _deliver(items: list[tuple[_Generation, int, Token | Finished]]) -> None:
    for generation, index, event in items:
        generation.pending.append((index, event))
        generation.wake()


@dataclass
class _Choice:
    """One sequence's answer as it builds up."""

    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    logprobs: dict[str, list] | None = None


class _Generation:
    """The sequences of one request, their events, and the OpenAI documents built from them."""

    def __init__(
        self, request: GenerationRequest, model: ServedModel, scheduler: Scheduler, outbox: _Outbox, chat: bool
    ) -> None:
        self.request, self.model, self.scheduler, self.chat = request, model, scheduler, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        #: (choice index, event) delivered by the outbox and not yet taken by :meth:`advance`.
        self.pending: list[tuple[int, Token | Finished]] = []
        self._waiter: asyncio.Future[None] | None = None
        self.sequences: list[Sequence] = []
        self.choices: list[_Choice] = []
        for prompt in request.prompts:
            for j in range(request.n):
                index = len(self.sequences)
                params = request.params
                if params.seed is not None and j:  # n samples of one seeded request differ, reproducibly
                    params = dataclasses.replace(params, seed=params.seed + j)
                sink = functools.partial(outbox.post, self, index)
                self.sequences.append(Sequence(prompt, params, sink))
                logprobs = None if params.logprobs is None else {k: [] for k in _LOGPROB_KEYS}
                self.choices.append(_Choice(TextStream(model.tokenizer, request.stop_strings), logprobs=logprobs))
        self._unfinished = len(self.choices)

    @property
    def finished(self) -> bool:
        """Every choice has its finish reason."""
        return not self._unfinished

    def wake(self, *_: object) -> None:
        """Wake :meth:`wait` (new events, or the client went away)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until there are events to take, or :meth:`wake` is called."""
        if not self.pending:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def cancel(self) -> None:
        """Free the slots of every sequence still running (the client went away)."""
        running = [s for s, c in zip(self.sequences, self.choices, strict=True) if c.finish is None]
        if running:
            self.scheduler.cancel(running)

    def advance(self) -> list[tuple[int, str, dict | None, str | None]]:
        """Take the pending events: (choice index, new text, new logprobs, finish reason) per event
        that adds to a choice, in order (a token's text may be empty while a character or a
        possible stop string is held back)."""
        events, self.pending = self.pending, []
        deltas: list[tuple[int, str, dict | None, str | None]] = []
        for index, event in events:
            choice = self.choices[index]
            if choice.finish is not None:
                continue
            if type(event) is Token:
                choice.token_ids.append(event.id)
                offset = choice.text.released
                text = choice.text.push(event.id)
                logprobs = None if choice.logprobs is None else self._logprobs(choice, event, offset)
                if choice.text.stopped:  # a stop string: the sequence ends here, its slot frees now
                    self._finish(choice, "stop")
                    self.scheduler.cancel([self.sequences[index]])
                deltas.append((index, text, logprobs, choice.finish))
            elif event.reason != "cancelled":
                self._finish(choice, event.reason)
                deltas.append((index, choice.text.flush(), None, event.reason))
        return deltas

    def _finish(self, choice: _Choice, reason: str) -> None:
        choice.finish = reason
        self._unfinished -= 1

    def _logprobs(self, choice: _Choice, token: Token, offset: int) -> dict | None:
        if choice.logprobs is None:
            return None
        decode = self.model.tokenizer.decode
        entry = {
            "tokens": [decode([token.id])],
            "token_logprobs": [token.logprob],
            "top_logprobs": [{decode([t]): lp for t, lp in token.top_logprobs}],
            "text_offset": [offset],
        }
        for key, values in entry.items():
            choice.logprobs[key].extend(values)
        return entry

    def usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(s.prompt) for s in self.sequences)
        return usage(prompt_tokens, sum(len(c.token_ids) for c in self.choices))

    # --- documents -----------------------------------------------------------------------------

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model.name, "choices": choices}

    def document(self) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        choices = []
        for index, c in enumerate(self.choices):
            choice: dict[str, Any] = {"index": index, "finish_reason": c.finish, "token_ids": c.token_ids}
            if self.chat:
                choice.update(message={"role": "assistant", "content": c.text.text}, logprobs=None)
            else:
                choice.update(text=c.text.text, logprobs=c.logprobs)
            choices.append(choice)
        return {**self._envelope(choices, chunk=False), "usage": self.usage()}

    def chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None, first: bool) -> dict[str, Any]:
        """One server-sent event's document: new text (and the finish reason once there is one)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": self.usage()}


_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


#: A text no template field holds: chunk documents made with it as the text, dumped and split
#: there, give the constant JSON around each token's text.
_SLOT = "\x00modelc-text\x00"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class _Events:
    """The server-sent events of one streamed generation: one OpenAI chunk per delta, each its own
    ``data:`` line, with the JSON around an ordinary token's text made once per choice."""

    def __init__(self, run: _Generation) -> None:
        self.run = run
        indices = range(len(run.choices))
        self.started = [False for _ in indices]
        quoted = json.dumps(_SLOT)
        self._around = [_sse(run.chunk(i, _SLOT, None, None, first=False)).split(quoted) for i in indices]
        # A chat delta without text is {} rather than {"content": ""}.
        self._empty = [_sse(run.chunk(i, "", None, None, first=False)) for i in indices]

    def encode(self, deltas: list[tuple[int, str, dict | None, str | None]]) -> str:
        """The events of ``deltas``, in order, as one string (one ASGI send however many there are)."""
        parts: list[str] = []
        started, around, chat = self.started, self._around, self.run.chat
        for index, text, logprobs, finish in deltas:
            if finish is None and logprobs is None and started[index]:
                if chat and not text:
                    parts.append(self._empty[index])
                else:
                    before, after = around[index]
                    parts += (before, encode_basestring_ascii(text), after)  # what json.dumps does to a str
            else:  # the first, the last, or one with logprobs: rare enough to build whole
                parts.append(_sse(self.run.chunk(index, text, logprobs, finish, first=not started[index])))
                started[index] = True
        return "".join(parts)


class _EventStream:
    """The streamed answer: an ASGI response that sends whatever events are pending at once.

    A decode step delivers one token per running sequence; the stream sends its events as soon
    as the loop gets to them, and when it falls behind (a slow client blocks the send, or a busy
    loop) the events that piled up meanwhile go out in one send. However the response ends, the
    request's sequences still running are cancelled, so a client that goes away frees its slots
    at the scheduler's next iteration."""

    def __init__(self, run: _Generation) -> None:
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run, events = self.run, _Events(self.run)
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        watcher.add_done_callback(run.wake)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            while not watcher.done():
                await run.wait()
                body = events.encode(run.advance())
                if run.finished:
                    if run.request.include_usage:
                        body += _sse(run.usage_chunk())
                    body += _sse("[DONE]")
                    await send({"type": "http.response.body", "body": body.encode(), "more_body": False})
                    return
                if body:
                    await send({"type": "http.response.body", "body": body.encode(), "more_body": True})
        finally:
            watcher.cancel()
            run.cancel()


def _sse(document: dict[str, Any] | str) -> str:
    return f"data: {document if isinstance(document, str) else json.dumps(document)}\n\n"


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def build_app(model: ServedModel, scheduler: Scheduler, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``model`` through ``scheduler``; ``api_key`` guards every route but /health."""

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    def guarded(handler: Callable[[Request], Awaitable[ASGIApp]]) -> Callable[[Request], Awaitable[ASGIApp]]:
        async def route(request: Request) -> ASGIApp:
            if not authorized(request):
                message = "missing or wrong API key (send Authorization: Bearer KEY)"
                return _error(401, message, "invalid_request_error", code="invalid_api_key")
            try:
                return await handler(request)
            except RequestError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)

        return route

    async def health(request: Request) -> Response:
        stats = scheduler.stats()
        if scheduler.failure is not None:
            return JSONResponse({"status": "failed", **stats}, status_code=500)
        accepting = scheduler.accepting
        return JSONResponse(
            {"status": "ok" if accepting else "draining", **stats}, status_code=200 if accepting else 503
        )

    async def models(request: Request) -> Response:
        card = {
            "id": model.name,
            "object": "model",
            "created": now(),
            "owned_by": "modelc",
            "max_model_len": model.max_seq_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}

    def outbox_of(loop: asyncio.AbstractEventLoop) -> _Outbox:
        if loop not in outboxes:
            outboxes[loop] = _Outbox(loop)
            scheduler.add_step_hook(outboxes[loop].flush)
        return outboxes[loop]

    def generation_route(parse: Callable[[dict, ServedModel], GenerationRequest], chat: bool):
        async def handler(request: Request) -> Response | _EventStream:
            parsed = parse(parse_json(await request.body()), model)
            run = _Generation(parsed, model, scheduler, outbox_of(asyncio.get_running_loop()), chat)
            try:
                scheduler.submit(run.sequences)
            except QueueFull as exc:
                message = f"the server is busy: {exc}; retry later"
                return _error(429, message, "rate_limit_error", code="rate_limit_exceeded")
            except NotAccepting as exc:
                return _error(503, str(exc), "service_unavailable")
            if parsed.stream:
                return _EventStream(run)
            return await _complete(request, run)

        return guarded(handler)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", guarded(models), methods=["GET"]),
            Route("/v1/completions", generation_route(parse_completion, chat=False), methods=["POST"]),
            Route("/v1/chat/completions", generation_route(parse_chat, chat=True), methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found},
    )


async def _complete(request: Request, run: _Generation) -> Response:
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    watcher.add_done_callback(run.wake)
    try:
        while not run.finished and not watcher.done():
            await run.wait()
            run.advance()
    finally:
        watcher.cancel()
        if not run.finished:  # the client went away (or the server cancelled us): nobody will read the answer
            run.cancel()
    if not run.finished:
        return Response(status_code=499)
    if any(c.finish == "error" for c in run.choices):
        return _error(500, "the engine failed while generating; see the server's log", "server_error")
    return JSONResponse(run.document())
