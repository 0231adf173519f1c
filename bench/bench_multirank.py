"""Benchmark multi-rank engines under mpirun beside the single-rank engine, on the same prompts.

Makes a random-weight Falcon (--variant layout, 7b by default: MQA, rotary, parallel attention;
the size is set by --hidden/--layers/--heads/--kv_heads), converts and builds it at each tensor x
pipeline split of --splits, then for each split and batch size starts the ranks (``mpirun -n
tp*pp``; the 1x1 split runs as a plain process) and measures, on rank 0 after one warm-up call:

    prefill ms      generate() with one new token (the prompt's forward pass plus one argmax)
    decode tok/s    batch x (N - 1) / (time(N new tokens) - time(1 new token))

and prints them side by side with the ratio to the 1x1 split. Tokens of every split are checked
against the 1x1 split's (greedy, so they must be equal).

    python bench/bench_multirank.py [--device cpu|cuda] [--splits 1x1,2x1,1x2] [--batch 1,8]

On a GPU host, give --device cuda (each rank takes cuda:local_rank; NCCL between them), e.g.
falcon-40b's layout at full width (falcon-7b's 71 heads admit no tensor-parallel split), in bf16
and then FP8 (``--qformat fp8`` quantizes each split with ``modelc quantize`` instead of converting):

    python bench/bench_multirank.py --device cuda --variant 40b --hidden 8192 --heads 128 --kv_heads 8 \
        --layers 12 --dtype bfloat16 --splits 2x1,4x1,8x1,2x2,4x2 --batch 1,8,32 [--qformat fp8]

Every rank's environment has NVLink multicast off (NCCL_NVLS_ENABLE=0 and its PyTorch and
NVSHMEM twins): on a shared host a program that uses it can take the GPUs out of service.
``--json F`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compiler_core.testing import NO_NVLINK_MULTICAST


def parse_splits(text: str) -> list[tuple[int, int]]:
    """ "2x1,1x2" -> [(1, 1), (2, 1), (1, 2)]: the single-rank baseline always comes first."""
    splits = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    return [(1, 1)] + [s for s in splits if s != (1, 1)]


def agreement(tokens: list, base: list) -> str:
    """'equal', or how many tokens match the baseline before each row's first difference."""
    if tokens == base:
        return "equal"
    rows = [(a[0], b[0]) for a, b in zip(tokens, base, strict=True)]
    same = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)) for a, b in rows)
    return f"{same}/{sum(len(b) for _, b in rows)} equal before a row diverges"


def prepare(args: argparse.Namespace) -> dict[tuple[int, int], Path]:
    """The HF model and one engine per split under --workdir (reused when present)."""
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    shape = {"hidden_size": args.hidden, "num_attention_heads": args.heads}
    if args.kv_heads is not None:
        shape["num_kv_heads"] = args.kv_heads
    root = (
        Path(args.workdir)
        / f"{args.variant}-h{args.hidden}-l{args.layers}-n{args.heads}-kv{args.kv_heads}-{args.dtype}"
    )
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        make_tiny_falcon(hf, args.variant, dtype=args.dtype, num_layers=args.layers, max_shard_size="2GB", **shape)
    engines = {}
    for tp, pp in parse_splits(args.splits):
        engine = root / f"tp{tp}pp{pp}-{args.qformat or 'full'}"
        if not (engine / "config.json").is_file():
            ckpt = root / f"tp{tp}pp{pp}-{args.qformat or 'full'}-ckpt"
            if args.qformat:
                quantize = [sys.executable, "-m", "compiler_core", "quantize", "--model_dir", str(hf)]
                quantize += ["--output_dir", str(ckpt), "--qformat", args.qformat, "--dtype", args.dtype]
                quantize += ["--tp_size", str(tp), "--pp_size", str(pp), "--device", args.device]
                subprocess.run(quantize, check=True)
            else:
                convert(hf, ckpt, dtype=args.dtype, mapping=Mapping.create(tp, pp), show_progress=False)
            build_engine(ckpt, engine, choose_backend("torch")[0], {}, show_progress=False)
        engines[(tp, pp)] = engine
    return engines


def worker(args: argparse.Namespace) -> None:
    """One rank of a measurement (every rank generates; rank 0 writes the result)."""
    import torch

    from compiler_core.runtime.generation import GenerationConfig, generate
    from compiler_core.runtime.open import is_output_rank, open_runner

    runner, _ = open_runner(Path(args.engine_dir), args.device)
    torch.manual_seed(0)
    prompts = torch.randint(1, 300, (args.batch_size, args.prompt_len)).tolist()

    def timed(new_tokens: int) -> tuple[float, list]:
        start = time.perf_counter()
        out = generate(runner, prompts, GenerationConfig(new_tokens))
        return time.perf_counter() - start, out

    timed(2)  # warm-up: allocation, kernel selection, communicator set-up
    t1 = min(timed(1)[0] for _ in range(args.repeat))
    runs = [timed(args.new_tokens) for _ in range(args.repeat)]
    tn, tokens = min(r[0] for r in runs), runs[0][1]
    if is_output_rank():
        result = {
            "prefill_ms": 1000 * t1,
            "decode_tok_s": args.batch_size * (args.new_tokens - 1) / max(tn - t1, 1e-9),
            "tokens": tokens,
        }
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def launch(args: argparse.Namespace, engine: Path, ranks: int, batch: int, result: Path) -> dict:
    beside_python = Path(sys.executable).with_name("mpirun")
    mpirun = str(beside_python) if beside_python.is_file() else shutil.which("mpirun") or "mpirun"
    command = [sys.executable, __file__, "--worker", "--engine_dir", str(engine), "--result", str(result)]
    command += ["--device", args.device, "--batch_size", str(batch), "--prompt_len", str(args.prompt_len)]
    command += ["--new_tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), **NO_NVLINK_MULTICAST}
    if ranks > 1:
        prefix = [mpirun, "-n", str(ranks), "--oversubscribe"]
        for name in ("OMP_NUM_THREADS", *NO_NVLINK_MULTICAST):
            prefix += ["-x", name]
        if os.geteuid() == 0:
            prefix.append("--allow-run-as-root")
        command = prefix + command
    subprocess.run(command, env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/modelc_bench_multirank")
    parser.add_argument("--splits", default="1x1,2x1,1x2", help="tp x pp per engine; 1x1 is the baseline")
    parser.add_argument("--batch", default="1,8", help="batch sizes")
    parser.add_argument("--variant", default="7b", help="tiny-falcon variant whose layout is used")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=None, help="default: the variant's (7b: 1, MQA)")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, float16 on cuda")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--qformat", default=None, help="quantize each split with modelc quantize (e.g. fp8)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--threads_per_rank", type=int, default=1, help="OMP_NUM_THREADS of each rank (CPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine_dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        worker(args)
        return
    engines = prepare(args)

    import torch

    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}"
    )
    print(
        f"# model: falcon {args.variant} layout, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"kv heads {args.kv_heads or 'as the variant'}; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeat}, "
        f"{args.threads_per_rank} thread(s) per rank; weights {args.qformat or args.dtype}"
    )
    header = f"{'split':>6} {'ranks':>5} {'batch':>5} {'prefill ms':>11} {'decode tok/s':>13} {'vs 1x1':>7}"
    print(f"{header} {'efficiency':>10}  tokens")
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        base = None
        for (tp, pp), engine in engines.items():
            res = launch(args, engine, tp * pp, batch, Path(args.workdir) / "result.json")
            base = base or res
            same = agreement(res["tokens"], base["tokens"])
            ratio = res["decode_tok_s"] / base["decode_tok_s"]
            # Tensor parallelism should scale decode with the ranks; pipeline stages add capacity, not speed.
            efficiency = ratio / tp
            print(
                f"{tp}x{pp:<4} {tp * pp:>5} {batch:>5} {res['prefill_ms']:>11.1f} "
                f"{res['decode_tok_s']:>13.1f} {ratio:>6.2f}x {efficiency:>9.0%}  {same}"
            )
            rows.append({"tp": tp, "pp": pp, "batch": batch, **{k: res[k] for k in ("prefill_ms", "decode_tok_s")}})
            rows[-1].update(speedup=ratio, tp_efficiency=efficiency, tokens_vs_1x1=same)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
