"""FP8 beside bf16: GEMM speed per Falcon linear shape and whole-model decode speed, one run.

A random-weight Falcon is made directly on ``--device`` in ``--dtype`` (nothing downloaded, no
HF model; ``--shape 7b`` has falcon-7b's dimensions: hidden 4544, 32 layers, 71 heads, MQA,
vocab 65024; ``--shape small`` is a Falcon-7B-style model with hidden 1024 and 8 layers). The
FP8 engines are made from the same weights by the fp8 scheme itself (``FP8Scheme.quantize``:
calibration forward on random tokens, amax/448 scales, float8_e4m3fn weights; lm_head stays
in ``--dtype`` as in the default exclusion), optionally with the FP8 KV cache on top.

1. GEMMs: each falcon linear ([out, in] = qkv 4672x4544, dense 4544x4544, fc 18176x4544, proj
   4544x18176 for 7b) at M rows (``--gemm_rows``): ``F.linear`` in the compute dtype vs the
   ``fp8_linear`` kernel (activation quantization + ``torch._scaled_mm`` on sm_89/sm_90, the
   emulated kernel elsewhere), median of ``--iters`` timed calls after a warm-up, with TFLOP/s.
2. Decode: ``generate()`` over the torch backend, bf16 vs FP8 weights (vs FP8 weights + FP8 KV
   cache), tokens/s = batch x (N - 1) / (time(N new tokens) - time(1 new token)), best of
   ``--repeat``; prefill ms = time(1 new token). The header gives each engine's weight bytes and
   the memory-bandwidth floor (weight bytes / measured copy traffic: the batch-1 decode steps/s
   of an engine that did nothing but read its weights once).

    python bench/bench_fp8.py                                        # CPU, small shape, float32
    python bench/bench_fp8.py --device cuda --shape 7b               # H100: falcon-7b, bf16
    python bench/bench_fp8.py --accuracy                             # CPU: accuracy table instead

``--accuracy`` measures what FP8 costs in accuracy instead of speed: for every Falcon variant a
tiny model (``--acc_layers`` layers, hidden ``--acc_hidden``) is trained for ``--acc_steps`` steps
on the shipped corpus (random tiny models predict almost uniformly, so their top-1 token flips
under any perturbation), then quantized with ``modelc quantize`` defaults on ``--acc_calib``
blocks of 128 tokens (fp8 weights, fp8 weights + fp8 KV cache, fp8 KV cache alone) and compared
with the float32 transformers model: logit error and top-1 agreement on the first 256 tokens of
each article of the shipped summarize sample, and ROUGE agreement of greedy summaries
(``--acc_output_len`` tokens after the article's last 512 - acc_output_len prompt tokens, the tiny
models' context; ``modelc summarize``'s engine_vs_hf) with transformers' own. A bfloat16 engine is
listed for scale: its logits against the float32 model, its summaries against transformers in
bfloat16 (summarize runs the reference in the engine's dtype).

On a CPU the FP8 GEMM is emulated (codes widened to the compute dtype), so CPU numbers show the
emulation's overhead, not FP8's speed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from common import copy_bandwidth, falcon_hf_config, shapes, timed

if TYPE_CHECKING:
    from compiler_core.formats.checkpoint_config import CheckpointConfig

SHAPES = shapes("small", "7b")


def falcon_config(shape: str, dtype: str) -> CheckpointConfig:
    """The modelc checkpoint config of a falcon-7b-style model (tp1)."""
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.host import load_registry
    from compiler_core.mapping import Mapping

    hf = falcon_hf_config(shape).to_dict()
    arch = load_registry().architecture_for_hf(hf, "bench")
    return CheckpointConfig.from_model_fields(arch.config_from_hf(hf), dtype, Mapping(), "bench")


def random_model(config: CheckpointConfig, device: str):
    """A LoadedModel with random weights made on ``device`` (matrices N(0, 0.02), norms 1, biases 0)."""
    from compiler_core.convert.from_hf import LoadedModel
    from compiler_core.dtypes import torch_dtype
    from compiler_core.host import load_registry
    from compiler_core.quantize.calibration import model_graph

    dtype = torch_dtype(config.dtype)
    model = LoadedModel(config, {})
    gen = torch.Generator(device=device).manual_seed(0)
    for name, param in model_graph(load_registry(), model).params.items():
        if len(param.shape) > 1:
            w = torch.empty(param.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        else:
            w = (torch.ones if name.endswith(".weight") else torch.zeros)(param.shape, dtype=dtype, device=device)
        model.weights[name] = w
    return model


def quantize_fp8(model, kv: bool, device: str, vocab: int):
    """The fp8 scheme applied to a copy of ``model`` (calibrated on 4 x 128 random tokens)."""
    from compiler_core.convert.from_hf import LoadedModel
    from compiler_core.host import load_registry
    from compiler_core.quantize.calibration import CalibrationBatch, CalibrationSet

    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(1))
    calibration = CalibrationSet((CalibrationBatch(ids, torch.ones_like(ids)),), "random tokens")
    registry = load_registry()
    options = {
        "device": device,
        "show_progress": False,
        "exclude_modules": None,
        "kv_cache_dtype": "fp8",
        "registry": registry,
    }
    scheme = registry.quant_schemes["fp8"]
    quantized = scheme.quantize(LoadedModel(model.config, dict(model.weights)), calibration, options)
    if kv:
        quantized = scheme.quantize_kv_cache(quantized, calibration, options)
    return quantized


def runner_of(model, device: str):
    from compiler_core.host import load_registry
    from compiler_core.mapping import Mapping
    from compiler_core.quantize.calibration import model_graph
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.runtime.session import TorchSession

    registry = load_registry()
    return LocalRunner([TorchSession(registry, model_graph(registry, model), model.weights, device)], Mapping())


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.weights.values())


def gemm_table(config: CheckpointConfig, args, dtype: torch.dtype) -> None:
    """Median time of F.linear (compute dtype) vs the kernel fp8_linear lowers to for each linear shape."""
    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.backends.torch.fused.fp8 import scaled_mm_supported
    from compiler_core.formats.checkpoint_config import QuantConfig
    from compiler_core.ir import GraphBuilder
    from modelc_plugins.quant_fp8 import numerics
    from modelc_plugins.quant_fp8.scheme import rewrite_graph

    model = config.model
    hidden, hd = model["hidden_size"], model["head_dim"]
    nh, nkv, ffn = model["num_attention_heads"], model["num_kv_heads"], model["ffn_hidden_size"]
    shapes = {
        "qkv": ((nh + 2 * nkv) * hd, hidden),
        "dense": (hidden, nh * hd),
        "fc": (ffn, hidden),
        "proj": (hidden, ffn),
    }
    device = torch.device(args.device)
    print(
        f"\n## GEMMs: {str(dtype).removeprefix('torch.')} F.linear vs fp8_linear "
        f"({'torch._scaled_mm' if scaled_mm_supported(device) else 'emulated: no FP8 tensor cores here'}), "
        f"median of {args.iters}"
    )
    fp = str(dtype).removeprefix("torch.")
    print(f"| linear [out x in] | M | {fp} ms | fp8 ms | fp8 speedup | {fp} TFLOP/s | fp8 TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (out, inp) in shapes.items():
        g = GraphBuilder("gemm")
        w = g.param("fc.weight", [out, inp], config.dtype)
        y = g.add("linear", ["x"], name="fc", params={"weight": w})
        graph = rewrite_graph(g.build(["x"], [y], {"dtype": config.dtype}), QuantConfig(quant_algo="FP8"))
        weight = torch.randn(out, inp, device=device, dtype=dtype) * 0.02
        w_scale = numerics.scale_from_amax(weight.float().abs().max()).to(device)
        weights = {
            "fc.weight": numerics.quantize(weight, w_scale),
            "fc.weights_scaling_factor": w_scale,
            "fc.activation_scaling_factor": torch.tensor([4.0 / 448], device=device),
        }
        (fp8,) = GraphExecutor(graph, weights, device).kernels  # the torch backend's fused FP8 GEMM
        for rows in (int(m) for m in args.gemm_rows.split(",")):
            x = torch.randn(rows, inp, device=device, dtype=dtype)
            fp_ms, fp8_ms = (
                1e3 * median_time(fn, args) for fn in (partial(F.linear, x, weight), partial(fp8, None, x))
            )
            tflop = 2 * rows * out * inp / 1e9  # per ms
            print(
                f"| {name} [{out}x{inp}] | {rows} | {fp_ms:.3f} | {fp8_ms:.3f} | {fp_ms / fp8_ms:.2f}x | "
                f"{tflop / fp_ms:.2f} | {tflop / fp8_ms:.2f} |",
                flush=True,
            )


def median_time(fn, args) -> float:
    """Median seconds of ``args.iters`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(timed(fn, args.device)[0] for _ in range(args.iters))


def decode_row(runners: dict[str, Any], batch: int, args, vocab: int) -> dict[str, Any]:
    from compiler_core.runtime.generation import GenerationConfig, generate

    prompts = torch.randint(100, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
    prompts = prompts.tolist()
    row: dict[str, Any] = {"batch": batch}
    for name, runner in runners.items():
        generate(runner, prompts, GenerationConfig(2))  # warm-up
        t1 = tn = float("inf")
        for _ in range(args.repeat):
            t1 = min(t1, timed(lambda r=runner: generate(r, prompts, GenerationConfig(1)), args.device)[0])
            tn = min(
                tn, timed(lambda r=runner: generate(r, prompts, GenerationConfig(args.new_tokens)), args.device)[0]
            )
        row[f"{name}_prefill_ms"] = 1e3 * t1
        row[f"{name}_tps"] = batch * (args.new_tokens - 1) / (tn - t1)
    return row


ACCURACY_VARIANTS = ("rw", "7b", "40b", "180b", "falcon2")
ACCURACY_ENGINES = {
    "bf16 (no quantization)": {"convert": "bfloat16"},
    "fp8 weights": {"qformat": "fp8"},
    "fp8 weights + fp8 KV": {"qformat": "fp8", "kv_cache_dtype": "fp8"},
    "fp8 KV only": {"qformat": "full_prec", "kv_cache_dtype": "fp8"},
}


def train_tiny(variant: str, out, tokenizer, args) -> None:
    """A tiny HF Falcon of ``variant`` trained for ``args.acc_steps`` AdamW steps on the shipped corpus."""
    import shutil

    from transformers import FalconForCausalLM

    from compiler_core.quantize.calibration import default_corpus
    from modelc_plugins.falcon.tiny import make_tiny_falcon

    init = out.with_name(out.name + "-init")
    shutil.rmtree(init, ignore_errors=True)
    make_tiny_falcon(
        init,
        variant,
        num_layers=args.acc_layers,
        hidden_size=args.acc_hidden,
        tokenizer=tokenizer,
        initializer_range=0.02,
    )
    ids = torch.tensor(tokenizer(default_corpus())["input_ids"])
    torch.manual_seed(0)
    model = FalconForCausalLM.from_pretrained(init)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(args.acc_steps):
        starts = torch.randint(0, len(ids) - 129, (16,)).tolist()
        batch = torch.stack([ids[s : s + 128] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(init)
    print(f"# {variant}: trained {args.acc_steps} steps, last loss {loss.item():.2f}", flush=True)


def accuracy(args) -> None:
    """The accuracy table (see the module docstring)."""
    import json
    import tempfile
    from importlib import resources
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from compiler_core.build.engine import build_engine
    from compiler_core.convert.from_hf import convert
    from compiler_core.evaluate.summarize import summarize
    from compiler_core.host import load_registry
    from compiler_core.quantize.ptq import quantize
    from compiler_core.runtime.context import positions_from_mask
    from compiler_core.runtime.loading import checkpoint_runner
    from modelc_plugins.falcon.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    lines = resources.files("compiler_core").joinpath("data/summarize_sample.jsonl").read_text().splitlines()
    ids = torch.tensor([tokenizer(json.loads(line)["article"])["input_ids"][:256] for line in lines])
    print(
        f"# tiny Falcons: {args.acc_layers} layers, hidden {args.acc_hidden}; calibration {args.acc_calib} x 128 "
        f"tokens of the shipped corpus; logits: {ids.shape[0]} articles x {ids.shape[1]} tokens; ROUGE: greedy "
        f"{args.acc_output_len}-token summaries of the {ids.shape[0]} articles vs transformers float32"
    )
    print(
        "| variant | engine | max abs logit err / max abs logit | mean abs err / max abs logit | top-1 agree | "
        "ROUGE-1 | ROUGE-2 | ROUGE-L |"
    )
    print("|---|---|---|---|---|---|---|---|")
    root = Path(tempfile.mkdtemp(prefix="bench_fp8_acc-"))
    mask = torch.ones_like(ids)
    for variant in args.acc_variants.split(","):
        hf_dir = root / variant
        train_tiny(variant, hf_dir, tokenizer, args)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
        scale = ref.abs().max().item()
        for name, how in ACCURACY_ENGINES.items():
            ckpt = root / f"{variant}-{len(name)}-ckpt"
            if "convert" in how:
                convert(hf_dir, ckpt, dtype=how["convert"], show_progress=False)
            else:
                quantize(
                    hf_dir, ckpt, dtype="float32", calib_size=args.acc_calib, calib_max_seq_length=128, batch_size=8,
                    device="cpu", show_progress=False, **how,
                )  # fmt: skip
            runner = checkpoint_runner(ckpt)
            runner.allocate(ids.shape[0], ids.shape[1])
            with torch.inference_mode():
                got = runner.logits(ids, positions_from_mask(mask), mask, 0).float()
            err = (got - ref).abs()
            engine = root / f"{variant}-{len(name)}-engine"
            build_engine(ckpt, engine, load_registry().backend("torch", "bench"), {}, show_progress=False)
            report = summarize(
                engine, hf_model_dir=hf_dir, test_hf=True, max_ite=ids.shape[0], output_len=args.acc_output_len,
                max_input_length=512 - args.acc_output_len, device="cpu", show_progress=False,
            )  # fmt: skip
            agree = report["engine_vs_hf"]
            print(
                f"| {variant} | {name} | {err.max().item() / scale:.4f} | {err.mean().item() / scale:.5f} | "
                f"{(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.2%} | {agree['rouge1']:.1f} | "
                f"{agree['rouge2']:.1f} | {agree['rougeL']:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", default="1,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--gemm_rows", default="1,16,64,256,2048", help="comma-separated GEMM row counts (M)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per GEMM")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no_kv", action="store_true", help="skip the FP8 weights + FP8 KV cache engine")
    parser.add_argument("--skip_gemm", action="store_true")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="print the accuracy table instead (CPU)")
    parser.add_argument("--acc_variants", default=",".join(ACCURACY_VARIANTS))
    parser.add_argument("--acc_layers", type=int, default=4)
    parser.add_argument("--acc_hidden", type=int, default=128)
    parser.add_argument("--acc_steps", type=int, default=300)
    parser.add_argument("--acc_calib", type=int, default=64, help="calibration blocks of 128 tokens")
    parser.add_argument("--acc_output_len", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy(args)
        return
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)

    config = falcon_config(args.shape, dtype_name)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(
        f"# {args.shape} Falcon (hidden {config.model['hidden_size']}, {config.model['num_hidden_layers']} layers, "
        f"{config.model['num_attention_heads']} heads, MQA, {dtype_name}) on {args.device} "
        f"({where or platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}"
    )
    if not args.skip_gemm:
        gemm_table(config, args, dtype)
    if args.skip_decode:
        return
    base = random_model(config, args.device)
    start = time.perf_counter()
    engines = {dtype_name: base, "fp8": quantize_fp8(base, False, args.device, config.model["vocab_size"])}
    seconds = time.perf_counter() - start
    if not args.no_kv:
        engines["fp8+kv"] = quantize_fp8(base, True, args.device, config.model["vocab_size"])
    bandwidth = copy_bandwidth(args.device)
    print(f"\n## Decode: generate(), prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeat}")
    print(f"# fp8 quantization (calibration + weights) took {seconds:.1f} s; copy traffic {bandwidth / 1e9:.0f} GB/s")
    for name, model in engines.items():
        nbytes = weight_bytes(model)
        print(f"# {name}: weights {nbytes / 2**30:.2f} GiB, weight-read floor {bandwidth / nbytes:.0f} steps/s")
    runners = {name: runner_of(model, args.device) for name, model in engines.items()}
    names = list(runners)
    print(
        "| batch | "
        + " | ".join(f"{n} prefill ms" for n in names)
        + " | "
        + " | ".join(f"{n} tok/s" for n in names)
        + " | fp8 speedup |"
    )
    print("|" + "---|" * (1 + 2 * len(names) + 1))
    for batch in (int(b) for b in args.batch.split(",")):
        r = decode_row(runners, batch, args, config.model["vocab_size"])
        print(
            f"| {batch} | "
            + " | ".join(f"{r[f'{n}_prefill_ms']:.1f}" for n in names)
            + " | "
            + " | ".join(f"{r[f'{n}_tps']:.1f}" for n in names)
            + f" | {r['fp8_tps'] / r[f'{dtype_name}_tps']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
