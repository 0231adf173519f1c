"""Benchmark `modelc convert` on a falcon-rw-1b-shaped bf16 checkpoint beside a plain `cp -r`.

Builds the source checkpoint once under --workdir (random bf16 tensors with falcon-rw-1b's names
and shapes, written shard by shard with safetensors so building it needs about one shard of
memory), then runs, each as a child process after a `sync`:

    cp -r SRC                                  (the floor: bytes moved by the kernel alone)
    modelc convert                 tp1         (whole model loaded, one rank)
    modelc convert --load_by_shard tp1         (one HF shard at a time)
    modelc convert                 tp2
    modelc convert --workers 2     tp2         (ranks in parallel processes)
    modelc convert --load_by_shard --workers 2 tp2

and prints wall time, throughput (source bytes / wall time, startup included), peak RSS of the
process itself (wait4's ru_maxrss, which includes waited-for children's maxima) and the peak of
the sum of RSS over the process tree (psutil, sampled every 20 ms) for each, then checks the
targets: convert throughput >= 0.5 x the copy's, and with --load_by_shard peak RSS <=
1.5 x (largest HF shard + largest rank file).

    python bench/bench_convert.py [--workdir /tmp/modelc_bench_convert] [--device cuda]

Conversion is host work: --device is accepted so the lead's GPU runs can pass it, and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

#: falcon-rw-1b (https://huggingface.co/tiiuae/falcon-rw-1b config.json).
RW_1B = {
    "architectures": ["FalconForCausalLM"],
    "model_type": "falcon",
    "alibi": True,
    "bias": True,
    "multi_query": False,
    "new_decoder_architecture": False,
    "parallel_attn": False,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "vocab_size": 50304,
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def rw_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a falcon-rw checkpoint (lm_head tied, so not stored)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.word_embeddings.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out += [(f"{p}.{ln}.weight", (h,)), (f"{p}.{ln}.bias", (h,))]
        for name, rows, cols in (
            ("self_attention.query_key_value", 3 * h, h),
            ("self_attention.dense", h, h),
            ("mlp.dense_h_to_4h", 4 * h, h),
            ("mlp.dense_4h_to_h", h, 4 * h),
        ):
            out += [(f"{p}.{name}.weight", (rows, cols)), (f"{p}.{name}.bias", (rows,))]
    out += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
    return out


def write_hf_source(model_dir: Path, cfg: dict, tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> None:
    """Write ``cfg`` as config.json + HF-named bf16 safetensors shards (+ index) of random weights.

    Shard by shard, so building it needs about one shard of memory; built beside the target and
    renamed into place, so an interrupted build leaves no half-written source.
    """
    import torch
    from safetensors.torch import save_file

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in shard}
        save_file(data, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
        print(f"  wrote {fname} ({sum(t.nbytes for t in data.values()) / 1e9:.2f} GB)", file=sys.stderr)
        del data
    total = sum(2 * int(torch.Size(s).numel()) for _, s in tensors)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


def build_source(model_dir: Path, shard_bytes: int, layers: int) -> None:
    """A falcon-rw-1b-shaped source with ``layers`` decoder layers."""
    cfg = {**RW_1B, "num_hidden_layers": layers}
    write_hf_source(model_dir, cfg, rw_tensors(cfg), shard_bytes)


def dir_bytes(d: Path, pattern: str = "*") -> list[int]:
    return [p.stat().st_size for p in Path(d).glob(pattern) if p.is_file()]


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` to completion: wall time, own max RSS (wait4, which folds in waited-for children),
    and, sampled every 20 ms, the peak RSS summed over the process tree and of its largest process."""
    import psutil

    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_tree = peak_one = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak_tree, peak_one
        while not done.is_set():
            try:
                root = psutil.Process(proc.pid)
                rss = [p.memory_info().rss for p in (root, *root.children(recursive=True))]
                peak_tree = max(peak_tree, sum(rss))
                peak_one = max(peak_one, *rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode(errors='replace')[-2000:]}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss * 1024,
        "tree": peak_tree,
        "one_process": peak_one,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/modelc_bench_convert"))
    ap.add_argument("--shard_gb", type=float, default=1.0, help="HF shard size of the source checkpoint.")
    ap.add_argument("--layers", type=int, default=24, help="Decoder layers (24 = falcon-rw-1b).")
    ap.add_argument("--repeat", type=int, default=1, help="Runs per row; the fastest is reported.")
    ap.add_argument("--device", default="cpu", help="Recorded only: conversion runs on the host.")
    ap.add_argument("--keep", action="store_true", help="Keep the outputs (the source is always kept).")
    ap.add_argument("--build_only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only is not None:
        build_source(args.build_only, int(args.shard_gb * 1e9), args.layers)
        return

    src = args.workdir / f"falcon-rw-1b-shaped-{args.layers}l-{args.shard_gb:g}gb"
    if not (src / "config.json").is_file():
        print(f"building {src} ...", file=sys.stderr)
        # In a child process: a child forked from a big parent would report the parent's RSS.
        build = [sys.executable, __file__, "--build_only", str(src), "--shard_gb", str(args.shard_gb)]
        subprocess.run([*build, "--layers", str(args.layers)], check=True)
    shards = dir_bytes(src, "*.safetensors")
    total = sum(shards)
    modelc = [sys.executable, "-m", "compiler_core", "convert", "--model_dir", str(src)]
    runs = [
        ("cp -r", lambda out: ["cp", "-r", str(src), str(out)], None),
        ("convert tp1", lambda out: [*modelc, "--output_dir", str(out)], 1),
        ("convert tp1 --load_by_shard", lambda out: [*modelc, "--output_dir", str(out), "--load_by_shard"], 1),
        ("convert tp2", lambda out: [*modelc, "--output_dir", str(out), "--tp_size", "2"], 2),
        (
            "convert tp2 --workers 2",
            lambda out: [*modelc, "--output_dir", str(out), "--tp_size", "2", "--workers", "2"],
            2,
        ),
        (
            "convert tp2 --load_by_shard --workers 2",
            lambda out: [*modelc, "--output_dir", str(out), "--tp_size", "2", "--load_by_shard", "--workers", "2"],
            2,
        ),
    ]
    rows = {}
    for label, make_cmd, _ in runs:
        out = args.workdir / "out"
        best = None
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            r = measure(make_cmd(out))
            best = r if best is None or r["wall"] < best["wall"] else best
        best["rank_max"] = max(dir_bytes(out, "rank*.safetensors"), default=0)
        rows[label] = best
        print(f"  {label}: {best['wall']:.2f} s", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(args.workdir / "out", ignore_errors=True)

    import torch

    gb = 1e9
    print(
        f"source: {src.name}: {len(shards)} safetensors shards, {total / gb:.2f} GB "
        f"(largest shard {max(shards) / gb:.2f} GB), bf16 -> bf16"
    )
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; python "
        f"{platform.python_version()}, torch {torch.__version__}; --device {args.device} (conversion runs on the host)"
    )
    print(
        f"{'run':<40} {'wall s':>8} {'GB/s':>7} {'CPU s':>7} {'peak RSS GB':>12} {'tree RSS GB':>12} "
        f"{'rank file GB':>13}"
    )
    for label, r in rows.items():
        print(
            f"{label:<40} {r['wall']:>8.2f} {total / r['wall'] / gb:>7.2f} {r['cpu']:>7.2f} {r['rss'] / gb:>12.2f} "
            f"{r['tree'] / gb:>12.2f} {r['rank_max'] / gb if label != 'cp -r' else float('nan'):>13.2f}"
        )
    copy_tp = total / rows["cp -r"]["wall"]
    conv_tp = total / rows["convert tp1"]["wall"]
    lbs = rows["convert tp1 --load_by_shard"]
    bound = 1.5 * (max(shards) + lbs["rank_max"])
    ok1 = conv_tp >= 0.5 * copy_tp
    ok2 = lbs["rss"] <= bound
    print(
        f"target throughput >= 0.5 x copy: {conv_tp / gb:.2f} vs {0.5 * copy_tp / gb:.2f} GB/s "
        f"-> {'PASS' if ok1 else 'FAIL'}"
    )
    print(
        f"target --load_by_shard peak RSS <= 1.5 x (largest shard + largest rank file): "
        f"{lbs['rss'] / gb:.2f} vs {bound / gb:.2f} GB -> {'PASS' if ok2 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
