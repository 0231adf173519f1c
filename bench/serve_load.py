"""Load on ``modelc serve``: N concurrent streaming clients beside offline ``generate`` at batch N.

A random-weight Falcon of ``--shape`` (see common.py) is saved with a tiny tokenizer, converted
and built into a torch engine (max_batch_size = ``--clients``) under ``--work_dir``. First the
engine's offline throughput is timed in this process: ``generate`` on ``--clients`` prompts at
once, greedy, ``--output_len`` new tokens (best of ``--repeat``). Then ``modelc serve`` starts on a
free loopback port and ``--clients`` clients each send ``--requests`` streaming completions one
after another (random token-id prompts of ``--prompt_len``, ``max_tokens=--output_len``,
``ignore_eos``), stopping early once ``--duration`` seconds have passed. The server sends one
event per token, so the client sees every token's arrival.

    aggregate tok/s   output tokens of all requests / wall time of the load phase
    TTFT              request sent -> first token event (p50, p99)
    ITL               gap between consecutive token events of one request (p50, p99)
    scheduler tok/s   the server's scheduler on the same prompts, in this process, without HTTP
    offline tok/s     clients x output_len / time of one generate() call at batch = clients

Loopback only, bounded in requests and time. ``--json F`` writes the numbers.

    python bench/serve_load.py                                   # CPU, overhead shape, 32 clients
    python bench/serve_load.py --device cuda --shape small --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import make_hf, shapes, timed

SHAPES = shapes("overhead", "tiny", "small", "7b")


def build(shape: str, dtype: str, batch: int, max_seq_len: int, work_dir: Path) -> Path:
    """The engine of a random Falcon of ``shape`` (built once per settings under ``work_dir``)."""
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert
    from modelc_plugins.falcon.tiny import train_tokenizer

    engine = work_dir / f"{shape}-{dtype}-b{batch}-s{max_seq_len}"
    if (engine / "config.json").is_file():
        return engine
    hf_dir = work_dir / f"{shape}-{dtype}-hf"
    if not (hf_dir / "config.json").is_file():
        hf, _ = make_hf(shape, getattr(torch, dtype), "cpu")
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


def scheduled(engine: Path, device: str, prompts: list[list[int]], output_len: int, repeat: int) -> float:
    """Output tokens/s of the server's scheduler on the same prompts in this process, without HTTP:
    how much of the gap to offline is in-flight batching and how much is serving."""
    from compiler_core.runtime.open import open_runner
    from compiler_core.serve.scheduler import SamplingParams, Scheduler, Sequence
    from compiler_core.serve.slots import SlotRunner

    runner, _ = open_runner(engine, device)
    max_seq_len = len(prompts[0]) + output_len
    scheduler = Scheduler(SlotRunner(runner, len(prompts), 2 * max_seq_len, 0), max_seq_len, 128, len(prompts))
    params = SamplingParams(max_tokens=output_len, temperature=0)

    def run() -> None:
        scheduler.submit([Sequence(p, params, lambda event: None) for p in prompts])
        while scheduler.stats()["busy"] or scheduler.stats()["waiting"]:
            scheduler.step()

    run()  # warm-up
    best = min(timed(run, device)[0] for _ in range(repeat))
    return len(prompts) * output_len / best


def start_server(engine: Path, device: str, max_seq_len: int, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "compiler_core", "serve", "--engine_dir", str(engine), "--port", "0"]
    command += ["--device", device, "--max_seq_len", str(max_seq_len), "--max_queue", "1024"]
    with open(log, "w") as err:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    line = server.stdout.readline()
    match = re.search(r"http://[\d.]+:\d+", line)
    if match is None:
        server.kill()
        raise SystemExit(f"modelc serve did not start: {line!r}\n{log.read_text()}")
    return server, match.group(0)


async def client(http, url: str, prompts: list[list[int]], args, deadline: float, results: list) -> None:
    import httpx

    for prompt in prompts:
        if time.perf_counter() >= deadline:
            return
        body = {"prompt": prompt, "max_tokens": args.output_len, "temperature": 0, "stream": True, "ignore_eos": True}
        sent = time.perf_counter()
        arrivals: list[float] = []  # one event per token; the finish reason comes in an event of its own
        tokens = 0
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if event["choices"] and event["choices"][0]["finish_reason"] is None:
                            arrivals.append(time.perf_counter())
                        elif not event["choices"]:
                            tokens = event["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            results.append({"error": str(exc)})
            return
        results.append({"sent": sent, "arrivals": arrivals, "tokens": tokens})


async def load(url: str, args, vocab: int) -> dict[str, Any]:
    import httpx

    generator = torch.Generator().manual_seed(1)
    per_client = [
        torch.randint(100, vocab, (args.requests, args.prompt_len), generator=generator).tolist()
        for _ in range(args.clients)
    ]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + args.duration
        await asyncio.gather(*(client(http, url, p, args, deadline, results) for p in per_client))
        wall = time.perf_counter() - start
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "arrivals" in r]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["arrivals"][0] - r["sent"] for r in done if r["arrivals"]]
    itl = [b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {
        "requests": len(done),
        "errors": errors[:3],
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
    parser.add_argument("--repeat", type=int, default=2, help="offline generate timings (best is kept)")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/modelc-serve-bench"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    max_seq_len = args.prompt_len + args.output_len
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

    engine = build(args.shape, dtype, args.clients, max_seq_len, args.work_dir)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = torch.randint(100, vocab, (args.clients, args.prompt_len), generator=torch.Generator().manual_seed(0))
    offline_tps = offline(engine, args.device, prompts.tolist(), args.output_len, args.repeat)
    scheduled_tps = scheduled(engine, args.device, prompts.tolist(), args.output_len, args.repeat)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the offline runner is gone: leave the GPU to the server

    server, url = start_server(engine, args.device, max_seq_len, args.work_dir / "serve.stderr")
    try:
        served = asyncio.run(load(url, args, vocab))
    finally:
        server.terminate()
        server.wait(60)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "device": f"{args.device} ({device}, {os.cpu_count()} cores)",
        "shape": args.shape,
        "dtype": dtype,
        "torch": torch.__version__,
        "clients": args.clients,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "offline_tps": offline_tps,
        "scheduler_tps": scheduled_tps,
        **served,
        "served_vs_offline": served["aggregate_tps"] / offline_tps,
    }
    print(f"{result['device']}, shape {args.shape} {dtype}, torch {torch.__version__}")
    print(f"{args.clients} clients x {args.requests} requests, prompt {args.prompt_len}, output {args.output_len}")
    print(f"{'':24}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}  (ms)")
    ttft, itl = served["ttft_ms"], served["itl_ms"]
    print(
        f"{'modelc serve':24}{served['aggregate_tps']:>10.1f}{ttft['p50']:>10.1f}{ttft['p99']:>10.1f}"
        f"{itl['p50']:>10.2f}{itl['p99']:>10.2f}"
    )
    print(f"{'scheduler, no HTTP':24}{scheduled_tps:>10.1f}")
    print(f"{f'offline generate b={args.clients}':24}{offline_tps:>10.1f}")
    counts = f"{served['requests']} requests, {len(served['errors'])} errors"
    print(f"served / offline: {result['served_vs_offline']:.2f}  ({counts})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
