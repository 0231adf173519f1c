"""Memory of a float32 CPU engine built from a bfloat16 checkpoint, with and without bfloat16-held weights.

A random-weight Falcon of ``--shape`` is saved in bfloat16, as published Falcon checkpoints are
(nothing downloaded), converted with ``--dtype float32`` and built into a torch engine. Each mode
then runs in a fresh process: load rank 0, generate ``--new_tokens`` greedy tokens for one prompt,
and report from ``/proc/self/status``:

    held MiB      bytes of the weights the executor holds
    load RSS      resident memory right after loading (anonymous + file-backed)
    final RSS     resident memory after generating
    peak RSS      the process's high-water mark (VmHWM)

    python bench/bench_memory.py                   # small shape: hidden 1024, 8 layers, vocab 65024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import make_hf, shapes

SHAPES = shapes("overhead", "small", "7b")

CHILD = """
import gc, json, sys
from compiler_core.build.engine import engine_mapping, load_rank_session, read_engine_config
from compiler_core.host import load_registry
from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.runner import LocalRunner

def mib():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}

engine, new_tokens = sys.argv[1], int(sys.argv[2])
config = read_engine_config(engine)
session = load_rank_session(load_registry(), engine, 0, "cpu", config)
gc.collect()
loaded = mib()
generate(LocalRunner([session], engine_mapping(config)), [list(range(11, 75))], GenerationConfig(new_tokens))
held = sum(w.numel() * w.element_size() for w in session.executor.weights.values()) >> 20
final = mib()
print(json.dumps({"held": held, "load": loaded["VmRSS"], "final": final["VmRSS"], "peak": final["VmHWM"]}))
"""


def build_engine(shape: str, root: Path) -> Path:
    """A float32 torch engine converted from a bfloat16 checkpoint of ``shape``."""
    from compiler_core.build.engine import build_engine as build
    from compiler_core.build.engine import choose_backend
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    hf, _ = make_hf(shape, torch.bfloat16, "cpu")
    hf.save_pretrained(root / "hf")
    del hf
    convert(root / "hf", root / "ckpt", dtype="float32", mapping=Mapping.create(1, 1), show_progress=False)
    build(root / "ckpt", root / "engine", choose_backend("torch")[0], {}, show_progress=False)
    return root / "engine"


def measure(engine: Path, new_tokens: int, bf16_weights: bool) -> dict[str, int]:
    env = dict(os.environ, MODELC_BF16_WEIGHTS="1" if bf16_weights else "0")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(engine), str(new_tokens)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelc-bench-memory-") as tmp:
        engine = build_engine(args.shape, Path(tmp))
        file_mib = (engine / "rank0.safetensors").stat().st_size >> 20
        print(
            f"# {args.shape} Falcon, float32 engine of a bfloat16 checkpoint ({file_mib} MiB rank file); "
            f"torch {torch.__version__}; one 64-token prompt, {args.new_tokens} new tokens"
        )
        print("| weights held as | held MiB | load RSS MiB | final RSS MiB | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for bf16_weights in (False, True):
            r = measure(engine, args.new_tokens, bf16_weights)
            label = "bfloat16 (default)" if bf16_weights else "float32 (MODELC_BF16_WEIGHTS=0)"
            print(f"| {label} | {r['held']} | {r['load']} | {r['final']} | {r['peak']} |", flush=True)


if __name__ == "__main__":
    main()
