"""Where one decode step's GPU time goes: the kernels of a modelc engine's decode step, per side.

For each side (as in ``gpu_decode.py``: bf16, fp8, fp8_kv, int4_awq) the run profiles ``generate``
with 1 and with ``1 + --steps`` new tokens under ``torch.profiler`` and subtracts the two, so what
remains is ``--steps`` decode steps (CUDA-graph replays included: the profiler records the kernels a
replayed graph launches). It prints, per side, every kernel name with its launches and GPU
microseconds per step, the kernel count and GPU time per step, and the step's wall time (from the
same runs, unprofiled), so the gap between the two is launch and host time.

With ``--prefill_len N`` it profiles a prompt pass instead: one ``N``-token prompt's ``generate``
of one token (after two untimed ones, so on CUDA the pass replays its graph), its kernels and
their GPU time against its wall time.

    python bench/profile_step.py --device cuda --batch 1 --sides bf16,fp8,fp8_kv,int4_awq
    python bench/profile_step.py --device cuda --prefill_len 1024 --sides bf16,fp8
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import shapes, sync
from gpu_decode import bench_model, build_side

SHAPES = shapes("overhead", "tiny", "small", "7b")


def kernel_totals(fn, device: str) -> tuple[Counter, Counter]:
    """(launches, GPU microseconds) per kernel name over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    launches: Counter = Counter()
    micros: Counter = Counter()
    for event in prof.events():
        if device.startswith("cuda") and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        launches[event.name] += 1
        micros[event.name] += event.device_time if device.startswith("cuda") else event.cpu_time
    return launches, micros


def wall_ms(fn, device: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def profile_side(gen, prompts: list[list[int]], steps: int, device: str) -> dict[str, Any]:
    gen(prompts, 1 + steps)  # warm-up: capture, compilation, cache sizing
    gen(prompts, 1)
    one_n, one_us = kernel_totals(lambda: gen(prompts, 1), device)
    all_n, all_us = kernel_totals(lambda: gen(prompts, 1 + steps), device)
    kernels = []
    for name in all_n:
        n = (all_n[name] - one_n.get(name, 0)) / steps
        us = (all_us[name] - one_us.get(name, 0.0)) / steps
        if n > 0.5:
            kernels.append({"kernel": name, "per_step": n, "us_per_step": us})
    kernels.sort(key=lambda k: -k["us_per_step"])
    step_ms = (wall_ms(lambda: gen(prompts, 1 + steps), device) - wall_ms(lambda: gen(prompts, 1), device)) / steps
    return {
        "kernels": kernels,
        "launches_per_step": sum(k["per_step"] for k in kernels),
        "gpu_us_per_step": sum(k["us_per_step"] for k in kernels),
        "wall_ms_per_step": step_ms,
    }


def profile_prefill(gen, prompts: list[list[int]], device: str) -> dict[str, Any]:
    """The kernels of one prompt pass of ``prompts`` (a one-token ``generate``), as "one step"."""
    for _ in range(2):  # the second use of a prompt shape captures its graph on CUDA
        gen(prompts, 1)
    launches, micros = kernel_totals(lambda: gen(prompts, 1), device)
    kernels = [{"kernel": k, "per_step": float(launches[k]), "us_per_step": micros[k]} for k in launches]
    kernels.sort(key=lambda k: -k["us_per_step"])
    return {
        "kernels": kernels,
        "launches_per_step": sum(launches.values()),
        "gpu_us_per_step": sum(micros.values()),
        "wall_ms_per_step": wall_ms(lambda: gen(prompts, 1), device),
    }


def report(name: str, prof: dict[str, Any], top: int, what: str = "step") -> str:
    lines = [
        f"## {name}: {prof['launches_per_step']:.0f} kernels, {prof['gpu_us_per_step'] / 1e3:.3f} ms of GPU time "
        f"per {what}; wall {prof['wall_ms_per_step']:.3f} ms per {what}",
        f"{'launches':>9} {'us/step':>9}  kernel",
    ]
    for k in prof["kernels"][:top]:
        lines.append(f"{k['per_step']:9.1f} {k['us_per_step']:9.1f}  {k['kernel'][:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: 7b on CUDA, tiny on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill_len", type=int, default=0, help="profile a prompt pass of this many tokens instead")
    parser.add_argument("--sides", default="bf16,fp8,fp8_kv,int4_awq")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per side")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    registry, hf, model = bench_model(args)
    vocab = hf.config.vocab_size
    length = args.prefill_len or args.prompt_len
    prompts = torch.randint(100, vocab, (args.batch, length), generator=torch.Generator().manual_seed(3)).tolist()
    what = "prompt pass" if args.prefill_len else "step"
    result: dict[str, Any] = {"shape": args.shape, "batch": args.batch, "prefill_len": args.prefill_len, "sides": {}}
    made: dict[str, Any] = {}
    for name in args.sides.split(","):
        gen, _ = build_side(registry, name, hf, model, args, made)
        if args.prefill_len:
            result["sides"][name] = profile_prefill(gen, prompts, args.device)
        else:
            result["sides"][name] = profile_side(gen, prompts, args.steps, args.device)
        print(report(name, result["sides"][name], args.top, what), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
