"""Streaming clients for bench/serve_load.py, run in processes of their own (no torch, no httpx).

The load generator must not be what the benchmark measures: httpx's streaming lines and the
openai client cost more CPU per token than the server's whole HTTP path, and on a small machine
they took a core from the server. Here each client is a plain asyncio connection that writes
its HTTP/1.1 request by hand and reads the chunked response body, splitting it into server-sent
events and stamping each token event with the time its bytes arrived (events that came in one
read share a time: that is when the client could see them).

Run by serve_load.py, not by hand: it reads one JSON job line on stdin, prints ``ready``, waits
for a ``go`` line, runs its clients, and writes ``{"requests": [...]}`` to the job's ``out``
file. Every request is bounded by ``request_timeout`` and the whole run by ``duration +
request_timeout``; a refused, failed or timed-out request is recorded as an error, not retried.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit


class _Connection:
    """One keep-alive HTTP/1.1 connection (opened again when the server closed it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> asyncio.StreamReader:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        assert self.reader is not None
        return self.reader

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _stream(connection: _Connection, body: bytes) -> dict[str, Any]:
    """One streamed completion: {"sent", "arrivals", "tokens", "done"}; raises on an HTTP error."""
    sent = time.monotonic()
    reader = await connection.post("/v1/completions", body)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    headers = {k.lower(): v.lower() for k, v in headers.items()}
    if headers.get("transfer-encoding") != "chunked":  # an error document (429, 503, 400...)
        text = await reader.readexactly(int(headers.get("content-length", "0")))
        raise RuntimeError(f"HTTP {status}: {text.decode(errors='replace')[:200]}")
    if headers.get("connection") == "close":
        connection.close()
    arrivals: list[float] = []  # one event per token; the finish reason comes in an event of its own
    tokens, pending, finished = 0, b"", False
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if not size:
            break
        now = time.monotonic()
        *events, pending = (pending + data[:-2]).split(b"\n\n")
        for event in events:
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                finished = True
                continue
            document = json.loads(payload)
            if not document["choices"]:
                tokens = document["usage"]["completion_tokens"]
            elif document["choices"][0]["finish_reason"] is None:
                arrivals.append(now)
    if status != 200 or not finished:
        raise RuntimeError(f"HTTP {status}: the stream ended without [DONE]")
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens, "done": time.monotonic()}


async def _client(job: dict[str, Any], prompts: list[list[int]], deadline: float, results: list) -> None:
    url = urlsplit(job["url"])
    connection = _Connection(url.hostname or "127.0.0.1", url.port or 80)
    try:
        for prompt in prompts:
            if time.monotonic() >= deadline:
                return
            body = {
                "prompt": prompt,
                "max_tokens": job["output_len"],
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            try:
                results.append(await asyncio.wait_for(_stream(connection, json.dumps(body).encode()), job["timeout"]))
            except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
                connection.close()  # the connection is in an unknown state
    finally:
        connection.close()


async def _run(job: dict[str, Any]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + job["duration"]
    clients = [_client(job, prompts, deadline, results) for prompts in job["clients"]]
    try:
        await asyncio.wait_for(asyncio.gather(*clients), job["duration"] + job["timeout"])
    except asyncio.TimeoutError:
        results.append({"error": "the clients outlasted duration + request_timeout"})
    return results


def main() -> None:
    job = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    results = _run_loop(job)
    with open(job["out"], "w") as out:
        json.dump({"requests": results}, out)


def _run_loop(job: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import uvloop  # the server's loop too, when installed: less of the client's CPU per event
    except ImportError:
        return asyncio.run(_run(job))
    return uvloop.run(_run(job))


if __name__ == "__main__":
    main()
