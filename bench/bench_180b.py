"""A Falcon-180B-wide model, converted shard by shard for many ranks and run under mpirun.

Builds (once, under --workdir) a random-weight bf16 checkpoint in the Hugging Face layout of
tiiuae/falcon-180B at full width (hidden 14848, 232 heads, 8 KV heads, vocab 65024, new decoder
architecture) with --layers of its 80 decoder layers, written shard by shard as HF does
(``model-0000i-of-0000n.safetensors`` + index), so that building it needs about one shard of memory.
Each decoder layer is about 4.4 GB of bf16; the disk must hold the source and one converted copy.

Then for each split of --splits (default tp8 and tp4 x pp2) it runs

    modelc convert --load_by_shard --workers W --tp_size T --pp_size P

as a child process and reports wall time, the peak RSS of the largest single process (a worker)
against the target 1.5 x (largest HF shard + largest rank file), and the peak summed over all
processes. With --run (a host with tp*pp GPUs) it then builds each split and measures decode under
``mpirun -n tp*pp`` at --batch (bench_multirank.py's worker), and with --fp8_tp N also FP8 at tpN.

    python bench/bench_180b.py --layers 2 --workers 2                      # conversion only, any host
    python bench/bench_180b.py --layers 16 --workers 8 --run --device cuda --fp8_tp 4   # 8 x H200

Every environment it starts has NVLink multicast off (see bench_multirank.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench_convert import dir_bytes, measure, write_hf_source

#: tiiuae/falcon-180B's config.json fields that shape the model (new decoder architecture, GQA).
FALCON_180B = {
    "architectures": ["FalconForCausalLM"],
    "model_type": "falcon",
    "alibi": False,
    "bias": False,
    "multi_query": True,
    "new_decoder_architecture": True,
    "parallel_attn": True,
    "hidden_size": 14848,
    "num_attention_heads": 232,
    "num_kv_heads": 8,
    "num_hidden_layers": 80,
    "vocab_size": 65024,
    "layer_norm_epsilon": 1e-5,
    "max_position_embeddings": 2048,
    "bos_token_id": 11,
    "eos_token_id": 11,
    "torch_dtype": "bfloat16",
}
HEAD_DIM = 64


def falcon_180b_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a new-decoder-architecture Falcon (lm_head tied, so not stored)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_kv_heads"]) * HEAD_DIM
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.word_embeddings.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}"
        for ln in ("ln_attn", "ln_mlp"):
            out += [(f"{p}.{ln}.weight", (h,)), (f"{p}.{ln}.bias", (h,))]
        out += [
            (f"{p}.self_attention.query_key_value.weight", (qkv_rows, h)),
            (f"{p}.self_attention.dense.weight", (h, h)),
            (f"{p}.mlp.dense_h_to_4h.weight", (4 * h, h)),
            (f"{p}.mlp.dense_4h_to_h.weight", (h, 4 * h)),
        ]
    out += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
    return out


def parse_splits(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]


def mpi_decode(args: argparse.Namespace, engine: Path, ranks: int, batch: int) -> dict:
    """Decode tokens/s and prefill ms of ``engine`` under mpirun, via bench_multirank's worker."""
    import bench_multirank

    worker_args = argparse.Namespace(
        device=args.device, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeat=args.repeat,
        threads_per_rank=1,
    )  # fmt: skip
    return bench_multirank.launch(worker_args, engine, ranks, batch, args.workdir / "result.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/modelc_bench_180b"))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 80 (about 4.4 GB each)")
    ap.add_argument("--shard_gb", type=float, default=4.0, help="HF shard size (falcon-180B ships ~4.5 GB shards)")
    ap.add_argument("--splits", default="8x1,4x2", help="tp x pp splits to convert")
    ap.add_argument("--workers", type=int, default=2, help="convert --workers")
    ap.add_argument("--run", action="store_true", help="also build and decode each split under mpirun (GPUs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fp8_tp", type=int, default=0, help="with --run: also quantize to FP8 at this tp and decode")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--build_only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = {**FALCON_180B, "num_hidden_layers": args.layers}
    if args.build_only is not None:
        write_hf_source(args.build_only, cfg, falcon_180b_tensors(cfg), int(args.shard_gb * 1e9))
        return

    src = args.workdir / f"falcon-180b-wide-{args.layers}l"
    if not (src / "config.json").is_file():
        print(f"building {src} ...", file=sys.stderr)
        # A child process: one forked from a big parent would report the parent's pages.
        build = [sys.executable, __file__, "--build_only", str(src), "--layers", str(args.layers)]
        subprocess.run([*build, "--shard_gb", str(args.shard_gb)], check=True)
    shards = dir_bytes(src, "*.safetensors")
    gb = 1e9
    modelc = [sys.executable, "-m", "compiler_core"]
    results = []
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores; source {src.name}: {len(shards)} shards, "
        f"{sum(shards) / gb:.1f} GB bf16, largest shard {max(shards) / gb:.2f} GB; convert --workers {args.workers}"
    )
    print(f"{'split':>6} {'wall s':>8} {'worker peak GB':>15} {'bound GB':>9} {'target':>7} {'all procs GB':>13}")
    for tp, pp in parse_splits(args.splits):
        ckpt = args.workdir / f"tp{tp}pp{pp}-ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        cmd = [*modelc, "convert", "--model_dir", str(src), "--output_dir", str(ckpt), "--dtype", "bfloat16"]
        cmd += ["--tp_size", str(tp), "--pp_size", str(pp), "--load_by_shard", "--workers", str(args.workers)]
        r = measure(cmd)
        rank_max = max(dir_bytes(ckpt, "rank*.safetensors"))
        bound = 1.5 * (max(shards) + rank_max)
        row = {"tp": tp, "pp": pp, "wall_s": r["wall"], "worker_peak_rss": r["one_process"], "bound": bound}
        row.update(tree_peak_rss=r["tree"], largest_rank_file=rank_max, largest_shard=max(shards))
        print(
            f"{tp}x{pp:<4} {r['wall']:>8.1f} {r['one_process'] / gb:>15.2f} {bound / gb:>9.2f} "
            f"{'PASS' if r['one_process'] <= bound else 'FAIL':>7} {r['tree'] / gb:>13.2f}"
        )
        if args.run:
            from compiler_core.build.engine import build_engine, choose_backend

            engine = args.workdir / f"tp{tp}pp{pp}-engine"
            shutil.rmtree(engine, ignore_errors=True)
            build_engine(ckpt, engine, choose_backend("torch")[0], {}, show_progress=False)
            row["decode"] = {b: mpi_decode(args, engine, tp * pp, int(b)) for b in args.batch.split(",")}
            for b, d in row["decode"].items():
                print(f"    batch {b}: decode {d['decode_tok_s']:.1f} tok/s, prefill {d['prefill_ms']:.1f} ms")
            shutil.rmtree(engine, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        results.append(row)
    if args.run and args.fp8_tp:
        ckpt, engine = args.workdir / "fp8-ckpt", args.workdir / "fp8-engine"
        quantize = [*modelc, "quantize", "--model_dir", str(src), "--output_dir", str(ckpt), "--qformat", "fp8"]
        subprocess.run([*quantize, "--tp_size", str(args.fp8_tp), "--device", args.device], check=True)
        from compiler_core.build.engine import build_engine, choose_backend

        build_engine(ckpt, engine, choose_backend("torch")[0], {}, show_progress=False)
        fp8 = {b: mpi_decode(args, engine, args.fp8_tp, int(b)) for b in args.batch.split(",")}
        for b, d in fp8.items():
            decode, prefill = d["decode_tok_s"], d["prefill_ms"]
            print(f"fp8 tp{args.fp8_tp} batch {b}: decode {decode:.1f} tok/s, prefill {prefill:.1f} ms")
        results.append({"fp8_tp": args.fp8_tp, "decode": fp8})
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}))


if __name__ == "__main__":
    main()
