"""Decode speed of an onnx engine (onnxruntime) beside the torch backend and transformers' ``generate``.

A random-weight Falcon is written as a Hugging Face checkpoint in a temporary directory (nothing
downloaded), converted with ``modelc convert`` and built twice with ``modelc build``: once with
``--backend torch`` and once with ``--backend onnx`` (and with ``--backend tensorrt`` too when a
TensorRT package imports and the GPU runs its engines). ``--shape small`` is a small
Falcon-7B-style model (hidden 1024, 8 layers, 16 query heads, one KV head, vocab 65024).

Every engine runs through the runtime's ``generate()``; HF runs ``FalconForCausalLM.generate``
(SDPA) on the same weights and prompts. After a warm-up call, each side is timed (best of
``--repeat``):

    prefill ms      generate with 1 new token (the prompt's forward pass + one argmax)
    decode tok/s    batch x (N - 1) / (time(N new tokens) - time(1 new token))

and its greedy tokens are compared with HF's ("tokens = HF").

    python bench/bench_onnx.py                        # CPU, float32, batch 1 and 8
    python bench/bench_onnx.py --device cuda          # GPU: float16; onnx via the CUDA provider if present
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import best_time, falcon_hf_config, shapes

SHAPES = shapes("small", "tiny")


def make_hf(shape: str, dtype: torch.dtype, out_dir: Path):
    """A random Falcon-7B-style HF checkpoint in ``out_dir``; returns the model (kept for HF's side)."""
    from transformers import FalconForCausalLM

    config = falcon_hf_config(shape)
    torch.manual_seed(0)
    model = FalconForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out_dir)
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = None  # random weights: never stop early on either side
    return model


def build_engines(hf_dir: Path, work: Path, dtype: str, backends: list[str]) -> dict[str, Path]:
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert

    checkpoint = work / "checkpoint"
    convert(hf_dir, checkpoint, dtype=dtype, show_progress=False)
    engines = {}
    for name in backends:
        backend, _ = choose_backend(name)
        engines[name] = work / f"engine-{name}"
        settings = {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 512}
        build_engine(checkpoint, engines[name], backend, settings, show_progress=False)
    return engines


def measure(fn, batch: int, args) -> dict[str, Any]:
    fn(2)  # warm-up: allocation, kernel selection, lazy initialisation
    t1, _ = best_time(lambda: fn(1), args.repeat, args.device)
    tn, tokens = best_time(lambda: fn(args.new_tokens), args.repeat, args.device)
    return {"prefill_ms": 1000 * t1, "decode_tps": batch * (args.new_tokens - 1) / (tn - t1), "tokens": tokens}


def available_backends(device: str) -> tuple[list[str], list[str]]:
    """(backends to run, notes on the ones left out) for ``device``."""
    from compiler_core.host import load_registry

    names, notes = ["torch", "onnx"], []
    if device.startswith("cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            names.remove("onnx")
            notes.append("onnx left out: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        tensorrt = load_registry().backends.get("tensorrt")
        if tensorrt is not None and tensorrt.preference() >= 0:
            names.append("tensorrt")
        elif tensorrt is not None:
            notes.append(f"tensorrt left out: {tensorrt.preference_reason()}")
    return names, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16"])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work_dir", type=Path, default=None, help="keep checkpoint and engines here")
    args = parser.parse_args()
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)

    import onnxruntime
    import transformers

    from compiler_core.runtime.generation import GenerationConfig, generate
    from compiler_core.runtime.open import open_runner

    backends, notes = available_backends(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        work = args.work_dir or Path(tmp)
        hf = make_hf(args.shape, dtype, work / "hf").to(args.device)
        engines = build_engines(work / "hf", work, dtype_name, backends)
        runners = {name: open_runner(path, args.device)[0] for name, path in engines.items()}
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
        params = sum(p.numel() for p in hf.parameters())
        print(
            f"# {args.shape} Falcon ({params / 1e6:.0f}M params, {dtype_name}) on {args.device} "
            f"({where or platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}; "
            f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeat}"
        )
        for note in notes:
            print(f"# {note}")
        print("| batch | side | prefill ms | decode tok/s | vs HF | tokens = HF |")
        print("|---|---|---|---|---|---|")
        for batch in (int(b) for b in args.batch.split(",")):
            torch.manual_seed(batch)
            prompts = torch.randint(100, SHAPES[args.shape]["vocab_size"] - 1, (batch, args.prompt_len)).tolist()
            ids = torch.tensor(prompts, device=args.device)

            def hf_generate(n: int, ids=ids) -> list[list[int]]:
                with torch.inference_mode():
                    out = hf.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
                    )
                return out[:, args.prompt_len :].tolist()

            sides = {"HF generate": hf_generate}
            for name, runner in runners.items():
                sides[f"modelc {name}"] = lambda n, r=runner, p=prompts: [
                    beams[0] for beams in generate(r, p, GenerationConfig(n, end_id=None))
                ]
            results = {side: measure(fn, batch, args) for side, fn in sides.items()}
            base = results["HF generate"]
            for side, r in results.items():
                equal = "-" if side == "HF generate" else ("yes" if r["tokens"] == base["tokens"] else "NO")
                print(
                    f"| {batch} | {side} | {r['prefill_ms']:.1f} | {r['decode_tps']:.1f} | "
                    f"{r['decode_tps'] / base['decode_tps']:.2f}x | {equal} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
