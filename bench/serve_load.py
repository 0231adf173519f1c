"""Load on ``modelc serve``: N concurrent streaming clients beside offline ``generate`` at batch N.

A random-weight Falcon of ``--shape`` (see common.py) is saved with a tiny tokenizer, converted
and built into a torch engine (max_batch_size = ``--clients``) under ``--work_dir``. First the
engine's offline throughput is timed in this process: ``generate`` on ``--clients`` prompts at
once, greedy, ``--output_len`` new tokens (best of ``--repeat``). Then ``modelc serve`` starts on a
free loopback port, answers one warm-up request (on CUDA its first decode step captures the
graph), and ``--clients`` clients each send ``--requests`` streaming completions one after another
(random token-id prompts of ``--prompt_len``, ``max_tokens=--output_len``, ``ignore_eos``),
stopping early once ``--duration`` seconds have passed. The clients run in ``--client_procs``
processes of their own (bench/serve_clients.py: plain asyncio HTTP/1.1, no httpx), so that the
load generator costs the server little CPU. The server sends one event per token (several in
one write when they piled up), so the client sees every token's arrival.

    aggregate tok/s   output tokens of all requests / wall time of the load phase
    TTFT              request sent -> first token event (p50, p99)
    ITL               gap between consecutive token events of one request (p50, p99)
    scheduler tok/s   the server's scheduler on the same prompts, in this process, without HTTP
    offline tok/s     clients x output_len / time of one generate() call at batch = clients
    graph steps       the server's decode steps during the load that replayed a CUDA graph
    engine busy       the share of the load's wall time the server's engine thread spent in iterations

and served / offline against issue 13's target (>= 0.80). Loopback only, bounded in requests and
time: the server's start, each request and the whole load have time limits, and a server that
exits or hangs ends the run with an error and its log's tail. ``--json F`` writes the numbers.

    python bench/serve_load.py                                   # CPU, overhead shape, 32 clients
    python bench/serve_load.py --device cuda:0 --shape small --json serve.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import selectors
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from common import make_hf, shapes, timed

SHAPES = shapes("overhead", "tiny", "small", "7b")
#: Issue 13's goal: 32 concurrent clients get at least this share of offline batch-32 decode.
TARGET = 0.8


def build(shape: str, dtype: str, batch: int, max_seq_len: int, work_dir: Path, device: str = "cpu") -> Path:
    """The engine of a random Falcon of ``shape`` (built once per settings under ``work_dir``); its random
    weights are drawn on ``device`` (a 7B model is initialised in seconds on a GPU, minutes on a CPU)."""
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert
    from modelc_plugins.falcon.tiny import train_tokenizer

    engine = work_dir / f"{shape}-{dtype}-b{batch}-s{max_seq_len}"
    if (engine / "config.json").is_file():
        return engine
    hf_dir = work_dir / f"{shape}-{dtype}-hf"
    if not (hf_dir / "config.json").is_file():
        hf, _ = make_hf(shape, getattr(torch, dtype), device)
        hf.save_pretrained(hf_dir)
        train_tokenizer().save_pretrained(hf_dir)  # a small vocabulary: larger ids decode to no text
        del hf
    checkpoint = work_dir / f"{shape}-{dtype}-ckpt"
    if not (checkpoint / "config.json").is_file():
        convert(hf_dir, checkpoint, dtype=dtype, show_progress=False)
    backend, _ = choose_backend("torch")
    limits = {"max_batch_size": batch, "max_input_len": max_seq_len, "max_seq_len": max_seq_len}
    build_engine(checkpoint, engine, backend, limits, show_progress=False)
    return engine


def offline(engine: Path, device: str, prompts: list[list[int]], output_len: int, repeat: int) -> float:
    """Output tokens/s of one ``generate`` call on all ``prompts`` (best of ``repeat``)."""
    from compiler_core.runtime.generation import GenerationConfig, generate
    from compiler_core.runtime.open import open_runner

    runner, _ = open_runner(engine, device)
    config = GenerationConfig(max_new_tokens=output_len, temperature=0)  # no end id: every row runs to the end
    generate(runner, prompts, GenerationConfig(max_new_tokens=2, temperature=0))  # warm-up (and graph capture)
    best = min(timed(lambda: generate(runner, prompts, config), device)[0] for _ in range(repeat))
    return len(prompts) * output_len / best


def scheduled(
    engine: Path, device: str, prompts: list[list[int]], output_len: int, repeat: int, prefill_chunk: int
) -> tuple[float, dict[str, float]]:
    """Output tokens/s of the server's scheduler on the same prompts in this process, without HTTP
    (how much of the gap to offline is in-flight batching and how much is serving), and the host
    time of its iterations in the best run: the median, the slowest (the prefill) and the count.
    Where the median is far below the step's GPU time, the host waits on the GPU inside it."""
    from compiler_core.runtime.open import open_runner
    from compiler_core.serve.scheduler import SamplingParams, Scheduler, Sequence
    from compiler_core.serve.slots import SlotRunner

    runner, _ = open_runner(engine, device)
    max_seq_len = len(prompts[0]) + output_len
    scheduler = Scheduler(
        SlotRunner(runner, len(prompts), 2 * max_seq_len, 0), max_seq_len, prefill_chunk, len(prompts)
    )
    params = SamplingParams(max_tokens=output_len, temperature=0)
    steps: list[float] = []

    def run() -> None:
        steps.clear()
        scheduler.submit([Sequence(p, params, lambda event: None) for p in prompts])
        while scheduler.stats()["busy"] or scheduler.stats()["waiting"]:
            start = time.perf_counter()
            scheduler.step()
            steps.append(time.perf_counter() - start)

    run()  # warm-up
    best, best_steps = float("inf"), []
    for _ in range(repeat):
        seconds = timed(run, device)[0]
        if seconds < best:
            best, best_steps = seconds, sorted(steps)
    iterations = {
        "count": len(best_steps),
        "median_ms": 1e3 * best_steps[len(best_steps) // 2],
        "slowest_ms": 1e3 * best_steps[-1],
    }
    return len(prompts) * output_len / best, iterations


def start_server(
    engine: Path, device: str, max_seq_len: int, prefill_chunk: int, log: Path, timeout: float
) -> tuple[subprocess.Popen, str]:
    """``modelc serve`` on a free loopback port: (process, base URL) once it printed its ready line."""
    command = [sys.executable, "-m", "compiler_core", "serve", "--engine_dir", str(engine), "--port", "0"]
    command += ["--device", device, "--max_seq_len", str(max_seq_len), "--max_queue", "1024"]
    command += ["--prefill_chunk", str(prefill_chunk)]
    with open(log, "w") as err:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    line = _readline(server.stdout, timeout)
    match = re.search(r"http://[\d.]+:\d+", line or "")
    if match is None:
        server.kill()
        server.wait(30)
        why = "did not print its ready line in time" if line is None else f"printed {line!r}"
        raise SystemExit(f"error: modelc serve {why}\n{_tail(log)}")
    return server, match.group(0)


def _readline(stream, timeout: float) -> str | None:
    """The next line of ``stream``, "" at its end, None when nothing came within ``timeout`` s."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        return stream.readline() if selector.select(timeout) else None


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return f"--- last lines of {log} ---\n" + "\n".join(text[-lines:])


def _get(url: str, body: dict | None = None, timeout: float = 30) -> dict[str, Any]:
    """A JSON GET (or POST of ``body``) with a bounded wait; /health answers 503/500 with JSON too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}")


def load(url: str, server: subprocess.Popen, args, vocab: int, log: Path) -> dict[str, Any]:
    """Run the clients in ``args.client_procs`` processes of bench/serve_clients.py; fail clearly, never hang."""
    generator = torch.Generator().manual_seed(1)
    per_client = [
        torch.randint(100, vocab, (args.requests, args.prompt_len), generator=generator).tolist()
        for _ in range(args.clients)
    ]
    procs = max(1, min(args.client_procs, args.clients))
    script = Path(__file__).with_name("serve_clients.py")
    workers, outs = [], []
    try:
        for i in range(procs):
            out = args.work_dir / f"clients-{i}.json"
            out.unlink(missing_ok=True)
            job = {
                "url": url,
                "clients": per_client[i::procs],
                "output_len": args.output_len,
                "duration": args.duration,
                "timeout": args.request_timeout,
                "out": str(out),
            }
            worker = subprocess.Popen(
                [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()
            workers.append(worker)
            outs.append(out)
        for worker in workers:
            if _readline(worker.stdout, 60) != "ready\n":
                raise SystemExit("error: a client process did not start")
        start = time.monotonic()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.close()
        deadline = start + args.duration + args.request_timeout + 30
        while any(w.poll() is None for w in workers):
            if server.poll() is not None:
                raise SystemExit(f"error: modelc serve exited ({server.returncode}) during the load\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the load did not finish within {deadline - start:.0f} s\n{_tail(log)}")
            time.sleep(0.1)
        if any(w.returncode for w in workers):
            raise SystemExit("error: a client process failed (its traceback is above)")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    results = [r for out in outs for r in json.loads(out.read_text())["requests"]]
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "arrivals" in r]
    if not done:
        raise SystemExit(f"error: no request completed ({len(errors)} errors, first: {errors[:1]})\n{_tail(log)}")
    wall = max(r["done"] for r in done) - start
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["arrivals"][0] - r["sent"] for r in done if r["arrivals"]]
    itl = [b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {
        "requests": len(done),
        "errors": errors[:3],
        "error_count": len(errors),
        "output_tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "ttft_ms": _percentiles(ttft),
        "itl_ms": _percentiles(itl),
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": float("nan"), "p99": float("nan")}
    cuts = statistics.quantiles(values, n=100)
    return {"p50": 1000 * statistics.median(values), "p99": 1000 * cuts[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shape", default="overhead", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (= the engine's batch)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="stop sending new requests after this (s)")
    parser.add_argument("--prefill_chunk", type=int, default=128, help="the server's (and scheduler's) --prefill_chunk")
    parser.add_argument("--repeat", type=int, default=2, help="offline generate timings (best is kept)")
    parser.add_argument(
        "--client_procs", type=int, default=None, help="processes the clients run in [default: 1 per 16 clients]"
    )
    parser.add_argument("--request_timeout", type=float, default=120.0, help="longest a request may take (s)")
    parser.add_argument("--start_timeout", type=float, default=600.0, help="longest the server may take to start (s)")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/modelc-serve-bench"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.client_procs is None:
        args.client_procs = max(1, min(4, args.clients // 16))
    device, device_name = _device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    max_seq_len = args.prompt_len + args.output_len
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

    engine = build(args.shape, dtype, args.clients, max_seq_len, args.work_dir, device)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = torch.randint(100, vocab, (args.clients, args.prompt_len), generator=torch.Generator().manual_seed(0))
    offline_tps = offline(engine, device, prompts.tolist(), args.output_len, args.repeat)
    scheduled_tps, iterations = scheduled(
        engine, device, prompts.tolist(), args.output_len, args.repeat, args.prefill_chunk
    )
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()  # the offline runners are gone: leave the GPU to the server

    log = args.work_dir / "serve.stderr"
    server, url = start_server(engine, device, max_seq_len, args.prefill_chunk, log, args.start_timeout)
    try:
        # One request first: the first decode step captures the CUDA graph, which is no part of serving.
        warmup = {"prompt": prompts[0, :4].tolist(), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        if "choices" not in _get(url + "/v1/completions", warmup, args.request_timeout):
            raise SystemExit(f"error: the warm-up request failed\n{_tail(log)}")
        before = _get(url + "/health")
        served = load(url, server, args, vocab, log)
        after = _get(url + "/health")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    graph_steps = after.get("graph_steps", 0) - before.get("graph_steps", 0)
    engine_iterations = after.get("iterations", 0) - before.get("iterations", 0)
    # The share of the load's wall time the engine thread spent in iterations (not waiting for work):
    # near 1, the engine bounds the throughput; well below it, requests reach it too slowly.
    engine_busy = (after.get("busy_s", 0.0) - before.get("busy_s", 0.0)) / served["wall_s"]

    result = {
        "device": f"{device} ({device_name}, {os.cpu_count()} cores)",
        "shape": args.shape,
        "dtype": dtype,
        "torch": torch.__version__,
        "clients": args.clients,
        "client_procs": args.client_procs,
        "prompt_len": args.prompt_len,
        "prefill_chunk": args.prefill_chunk,
        "output_len": args.output_len,
        "offline_tps": offline_tps,
        "scheduler_tps": scheduled_tps,
        "scheduler_iterations": iterations,
        **served,
        "decode_steps": steps,
        "graph_steps": graph_steps,
        "engine_iterations": engine_iterations,
        "engine_busy": engine_busy,
        "served_vs_offline": served["aggregate_tps"] / offline_tps,
    }
    result["target_met"] = result["served_vs_offline"] >= TARGET
    print(f"{result['device']}, shape {args.shape} {dtype}, torch {torch.__version__}")
    print(
        f"{args.clients} clients x {args.requests} requests in {args.client_procs} processes, "
        f"prompt {args.prompt_len}, output {args.output_len}"
    )
    print(f"{'':24}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}  (ms)")
    ttft, itl = served["ttft_ms"], served["itl_ms"]
    print(
        f"{'modelc serve':24}{served['aggregate_tps']:>10.1f}{ttft['p50']:>10.1f}{ttft['p99']:>10.1f}"
        f"{itl['p50']:>10.2f}{itl['p99']:>10.2f}"
    )
    print(
        f"{'scheduler, no HTTP':24}{scheduled_tps:>10.1f}  ({iterations['count']} iterations: median "
        f"{iterations['median_ms']:.2f} ms, slowest {iterations['slowest_ms']:.2f} ms on the host)"
    )
    print(f"{f'offline generate b={args.clients}':24}{offline_tps:>10.1f}")
    print(f"server decode steps: {steps}, of which replayed a CUDA graph: {graph_steps}")
    per_iteration = 1e3 * engine_busy * served["wall_s"] / max(engine_iterations, 1)
    print(
        f"server engine: {engine_iterations} iterations, busy {100 * engine_busy:.0f}% of the load's wall time "
        f"({per_iteration:.2f} ms per iteration)"
    )
    counts = f"{served['requests']} requests, {served['error_count']} errors"
    verdict = "met" if result["target_met"] else "not met"
    print(f"served / offline: {result['served_vs_offline']:.2f}  (target >= {TARGET:.2f}: {verdict}; {counts})")
    if served["errors"]:
        print(f"first errors: {served['errors']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _device(device: str) -> tuple[str, str]:
    """(the device with its index, its name): the server and this process use the same GPU."""
    if device == "cpu":
        return device, platform.processor() or "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise SystemExit(f"error: --device {device}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: CUDA is not available here")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    torch.cuda.set_device(index)
    return f"cuda:{index}", torch.cuda.get_device_name(index)


if __name__ == "__main__":
    main()
