"""The ASGI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, and /health.

Handlers run on the event loop; generation runs on the scheduler's engine thread, which hands
each token to the request's asyncio queue. A request whose client goes away (a closed stream, or
a disconnect while a non-streamed answer is pending) cancels its sequences, which frees their
slots at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

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


class _Mailbox:
    """Hands events from the engine thread to the event loop's queues, waking the loop once per batch
    of events (a decode step emits one per running sequence) instead of once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup_pending = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._pending.append((queue, item))
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            self._wakeup_pending = False
            items, self._pending = self._pending, collections.deque()
        for queue, item in items:
            queue.put_nowait(item)


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
        self, request: GenerationRequest, model: ServedModel, scheduler: Scheduler, mailbox: _Mailbox, chat: bool
    ) -> None:
        self.request, self.model, self.scheduler, self.chat = request, model, scheduler, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.events: asyncio.Queue[tuple[int, Token | Finished]] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.choices: list[_Choice] = []
        for prompt in request.prompts:
            for j in range(request.n):
                index = len(self.sequences)
                params = request.params
                if params.seed is not None and j:  # n samples of one seeded request differ, reproducibly
                    params = dataclasses.replace(params, seed=params.seed + j)
                sink = functools.partial(self._receive, mailbox, index)
                self.sequences.append(Sequence(prompt, params, sink))
                logprobs = None if params.logprobs is None else {k: [] for k in _LOGPROB_KEYS}
                self.choices.append(_Choice(TextStream(model.tokenizer, request.stop_strings), logprobs=logprobs))

    def _receive(self, mailbox: _Mailbox, index: int, event: Token | Finished) -> None:
        mailbox.post(self.events, (index, event))  # on the engine thread

    def cancel(self) -> None:
        """Free the slots of every sequence still running (the client went away)."""
        self.scheduler.cancel([s for s, c in zip(self.sequences, self.choices, strict=True) if c.finish is None])

    async def deltas(self) -> AsyncIterator[tuple[int, str, dict | None]]:
        """(choice index, new text, new logprobs) as tokens arrive, until every choice has finished."""
        while any(c.finish is None for c in self.choices):
            index, event = await self.events.get()
            choice = self.choices[index]
            if choice.finish is not None:
                continue
            if isinstance(event, Token):
                choice.token_ids.append(event.id)
                offset = len(choice.text.text)
                text = choice.text.push(event.id)
                logprobs = self._logprobs(choice, event, offset)
                if choice.text.stopped:  # a stop string: the sequence ends here, its slot frees now
                    choice.finish = "stop"
                    self.scheduler.cancel([self.sequences[index]])
                yield index, text, logprobs
            elif event.reason != "cancelled":
                choice.finish = event.reason
                yield index, choice.text.flush(), None

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

    def chunk(self, index: int, text: str, logprobs: dict | None, first: bool) -> dict[str, Any]:
        """One server-sent event's document: new text (and the finish reason once there is one)."""
        finish = self.choices[index].finish
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": self.usage()}


_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class _EventStream(StreamingResponse):
    """Server-sent events that cancel the request's sequences however the response ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(document: dict[str, Any] | str) -> str:
    return f"data: {document if isinstance(document, str) else json.dumps(document)}\n\n"


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(model: ServedModel, scheduler: Scheduler, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``model`` through ``scheduler``; ``api_key`` guards every route but /health."""

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
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

    mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    def generation_route(parse: Callable[[dict, ServedModel], GenerationRequest], chat: bool):
        async def handler(request: Request) -> Response:
            parsed = parse(parse_json(await request.body()), model)
            loop = asyncio.get_running_loop()
            mailbox = mailboxes.setdefault(loop, _Mailbox(loop))
            run = _Generation(parsed, model, scheduler, mailbox, chat)
            try:
                scheduler.submit(run.sequences)
            except QueueFull as exc:
                message = f"the server is busy: {exc}; retry later"
                return _error(429, message, "rate_limit_error", code="rate_limit_exceeded")
            except NotAccepting as exc:
                return _error(503, str(exc), "service_unavailable")
            if parsed.stream:
                return _EventStream(_stream(run), run.cancel)
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


async def _stream(run: _Generation) -> AsyncIterator[str]:
    # One event per generated token (its text may be empty while a character or a possible stop
    # string is held back), so clients can time every token.
    started: set[int] = set()
    async for index, text, logprobs in run.deltas():
        yield _sse(run.chunk(index, text, logprobs, first=index not in started))
        started.add(index)
    if run.request.include_usage:
        yield _sse(run.usage_chunk())
    yield _sse("[DONE]")


async def _complete(request: Request, run: _Generation) -> Response:
    async def collect() -> None:
        async for _ in run.deltas():
            pass

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(_until_disconnected(request))
    await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    watching.cancel()
    if not collecting.done():  # the client went away: nobody will read the answer
        collecting.cancel()
        run.cancel()
        return Response(status_code=499)
    if any(c.finish == "error" for c in run.choices):
        return _error(500, "the engine failed while generating; see the server's log", "server_error")
    return JSONResponse(run.document())
