"""Faults a server meets: clients that go away, a full queue, SIGTERM with requests running."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from compiler_core.testing import serving

#: Long enough that no request here finishes by itself before the test acts on it.
LONG = 2000


@pytest.fixture(scope="module")
def long_engine(engine):
    return engine("7b", max_seq_len=LONG + 8)


def start_stream(url: str, max_tokens: int = LONG):
    """Start a streaming completion that ignores the end token: (client, remaining lines) after its first token."""
    client = httpx.Client(timeout=60)
    body = {"prompt": "Light", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    response = client.send(client.build_request("POST", url + "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    return client, lines


def events(lines) -> list[dict]:
    """The remaining server-sent events of a stream, up to [DONE]."""
    out = []
    for line in lines:
        if line == "data: [DONE]":
            return out
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def health(url: str) -> dict:
    return httpx.get(url + "/health").json()


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(long_engine, tmp_path):
    with serving(long_engine, "--max_batch_size", "1", log_dir=tmp_path) as server:
        client, _ = start_stream(server.url)
        assert health(server.url)["busy"] == 1
        client.close()  # drops the connection mid-stream
        wait_for(lambda: health(server.url)["busy"] == 0, "the slot to be freed")
        assert health(server.url)["generated"] < LONG, "the request ran on after its client left"
        answer = httpx.post(server.url + "/v1/completions", json={"prompt": "Light", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(long_engine, tmp_path):
    with serving(long_engine, "--max_batch_size", "1", log_dir=tmp_path) as server:
        body = {"prompt": "Light", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up after half a second
            httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        wait_for(lambda: health(server.url)["busy"] == 0, "the slot to be freed")
        assert health(server.url)["generated"] < LONG, "the request ran on after its client left"


def test_a_full_queue_answers_429(long_engine, tmp_path):
    with serving(long_engine, "--max_batch_size", "1", "--max_queue", "1", log_dir=tmp_path) as server:
        client, _ = start_stream(server.url)  # holds the only slot
        queued: dict = {}
        body = {"prompt": "Light", "max_tokens": 3, "temperature": 0}
        waiter = threading.Thread(
            target=lambda: queued.update(r=httpx.post(server.url + "/v1/completions", json=body, timeout=60))
        )
        waiter.start()
        wait_for(lambda: health(server.url)["waiting"] == 1, "the second request to queue")
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        client.close()
        waiter.join(60)
        assert queued["r"].status_code == 200, "the queued request is served once the slot frees"


def test_sigterm_lets_running_requests_finish_and_exits_0(long_engine, tmp_path):
    with serving(long_engine, "--max_batch_size", "2", log_dir=tmp_path) as server:
        client, lines = start_stream(server.url, max_tokens=200)
        os.kill(server.process.pid, signal.SIGTERM)
        rest = events(lines)
        client.close()
        assert rest[-1]["usage"]["completion_tokens"] == 200
        assert [e["choices"][0]["finish_reason"] for e in rest if e["choices"]][-1] == "length"
        assert server.process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")


def test_sigterm_aborts_requests_that_outlast_the_shutdown_timeout(long_engine, tmp_path):
    with serving(long_engine, "--shutdown_timeout", "0.2", log_dir=tmp_path) as server:
        client, lines = start_stream(server.url)
        os.kill(server.process.pid, signal.SIGTERM)
        rest = events(lines)
        client.close()
        assert [e["choices"][0]["finish_reason"] for e in rest if e["choices"]][-1] == "abort"
        assert rest[-1]["usage"]["completion_tokens"] < LONG
        assert server.process.wait(60) == 0


def frontend_of(server) -> psutil.Process:
    """The server's HTTP frontend: the child process that multiprocessing spawned."""
    children = psutil.Process(server.process.pid).children()
    (frontend,) = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    return frontend


def test_a_frontend_that_dies_ends_the_server_with_an_error(long_engine, tmp_path):
    with serving(long_engine, log_dir=tmp_path) as server:
        frontend_of(server).kill()
        assert server.process.wait(60) == 1
        assert "the HTTP frontend exited with status -9" in server.stderr.read_text()


def test_the_frontend_exits_when_the_engine_process_dies(long_engine, tmp_path):
    with serving(long_engine, log_dir=tmp_path) as server:
        client, _ = start_stream(server.url)
        frontend = frontend_of(server)
        server.process.kill()  # no chance to tell the frontend anything
        server.process.wait(60)
        frontend.wait(30)  # raises psutil.TimeoutExpired if it lingers on with the port
        client.close()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")


def test_ctrl_c_in_a_terminal_drains_both_processes_and_exits_0(long_engine, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground group, the frontend included: the
    frontend leaves it to the engine process, which lets the running request finish."""
    with serving(long_engine, "--max_batch_size", "2", log_dir=tmp_path, new_session=True) as server:
        client, lines = start_stream(server.url, max_tokens=200)
        os.killpg(server.process.pid, signal.SIGINT)
        rest = events(lines)
        client.close()
        assert rest[-1]["usage"]["completion_tokens"] == 200
        assert server.process.wait(60) == 0
