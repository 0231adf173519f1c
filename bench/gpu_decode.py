"""GPU decode, one run: the bandwidth floor, HF's two generate paths and every modelc engine side by side.

A random-weight Falcon is made from a config (``--shape``: ``7b`` has falcon-7b's dimensions,
``tiny`` is small enough for a CPU; nothing is downloaded), in bfloat16 on CUDA (float32 on
CPU). From the same weights the run builds

    hf eager          transformers' ``generate`` (SDPA attention, dynamic cache)
    hf static+compile ``generate`` with the static cache and ``torch.compile`` (default mode), the
                      strongest HF peer; compiled once per batch size, so only ``--compiled_batch``
    bf16              modelc, full precision
    fp8               modelc, FP8 W8A8 weights (the fp8 scheme, calibrated on random tokens)
    fp8+kv            the same with the FP8 KV cache
    int4_awq          modelc, INT4-AWQ group 128 (the int4_awq scheme)

and measures, for each at every ``--batch``: decode tokens/s = batch x (N - 1) / (time(N new
tokens) - time(1 new token)) with prompt ``--prompt_len`` and N = ``--new_tokens``, best of
``--repeat`` with the spread (worst / best); and at batch 1 the prefill of each of
``--prefill_len``'s prompt lengths (time to first token: the first pass of that length, what a
one-off prompt waits, and the best and worst of ``--repeat`` after a second pass, which on CUDA
captures modelc's graph of it). The default lengths are the issue's two: 128 tokens (INT4 against
bf16) and 1024 (bf16 and FP8 time to first token).
A modelc side named with the suffix
``_no_triton`` (``bf16_no_triton``, ...) is the same engine built with ``MODELC_TRITON=0``: the
kernels before the Triton fast path. The floor is the weight-read limit: engine weight bytes /
measured copy traffic, in decode steps/s. A table is printed and written as JSON (``--json``).

    python bench/gpu_decode.py --device cuda                  # falcon-7b shape on a GPU
    python bench/gpu_decode.py --device cpu --shape tiny --new_tokens 4 --repeat 1 --prefill_len 32

On a CPU the numbers exercise the script, not a GPU's speed (FP8 is emulated there and INT4 is
dequantized at load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import copy_bandwidth, make_hf, shapes, sync

from compiler_core.host import load_registry
from compiler_core.registry import Registry

SHAPES = shapes("overhead", "tiny", "small", "7b")
#: In the order measured: the HF peers last (compilation is slow), so a timeout costs them first.
SIDES = ("bf16", "fp8", "fp8_kv", "int4_awq", "hf_eager", "hf_compiled")
#: A side name with this suffix builds the same engine with ``MODELC_TRITON=0``: the kernels before
#: the Triton fast path (cuBLAS / cuBLASLt / tinygemm and torch attention), for comparison.
NO_TRITON = "_no_triton"


def loaded_model(registry: Registry, hf, dtype: torch.dtype):
    """The HF model's weights as a modelc LoadedModel (IR names, tp1; views where the layout allows)."""
    from compiler_core.convert.from_hf import LoadedModel, map_tensors
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.mapping import Mapping

    hf_dict = hf.config.to_dict()
    arch = registry.architecture_for_hf(hf_dict, "bench")
    fields = arch.config_from_hf(hf_dict)
    config = CheckpointConfig.from_model_fields(fields, str(dtype).removeprefix("torch."), Mapping(), "bench")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    return LoadedModel(config, dict(map_tensors(arch, config, state.items(), "bench")))


def model_dtype(device: str) -> torch.dtype:
    """The benchmarks' model dtype: bfloat16 on CUDA, float32 on a CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def bench_model(args) -> tuple[Registry, Any, Any]:
    """(registry, random HF Falcon, its modelc LoadedModel) of ``args.shape`` on ``args.device``; an
    unset ``args.shape`` becomes ``7b`` on CUDA, ``tiny`` on a CPU."""
    args.shape = args.shape or ("7b" if args.device.startswith("cuda") else "tiny")
    dtype = model_dtype(args.device)
    registry = load_registry()
    hf, _ = make_hf(args.shape, dtype, args.device)
    return registry, hf, loaded_model(registry, hf, dtype)


def calibration(vocab: int, blocks: int, length: int):
    from compiler_core.quantize.calibration import CalibrationBatch, CalibrationSet

    gen = torch.Generator().manual_seed(1)
    batches = tuple(
        CalibrationBatch(ids, torch.ones_like(ids))
        for ids in torch.randint(100, vocab, (blocks, 1, length), generator=gen)
    )
    return CalibrationSet(batches, "random tokens")


def quantized(registry: Registry, model, side: str, device: str, vocab: int):
    """A copy of ``model`` quantized for engine ``side`` by the project's own scheme."""
    from compiler_core.convert.from_hf import LoadedModel

    copy = LoadedModel(model.config, dict(model.weights))
    calib = calibration(vocab, 4, 64)
    common = {"registry": registry, "device": device, "show_progress": False}
    if side == "int4_awq":
        options = {**common, "group_size": 128, "awq_max_tokens": 256}
        return registry.quant_schemes["int4_awq"].quantize(copy, calib, options)
    scheme = registry.quant_schemes["fp8"]
    options = {**common, "exclude_modules": None, "kv_cache_dtype": "fp8"}
    out = scheme.quantize(copy, calib, options)
    return scheme.quantize_kv_cache(out, calib, options) if side == "fp8_kv" else out


def engine(registry: Registry, model, device: str):
    """(runner, resident weight bytes) of a modelc engine of ``model`` on ``device``."""
    from compiler_core.convert.from_hf import rank_weights
    from compiler_core.mapping import Mapping
    from compiler_core.model import rank_graph
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.runtime.session import TorchSession

    graph = rank_graph(registry, model.config, 0)
    session = TorchSession(registry, graph, rank_weights(registry, model, 0), device)
    held = {w.data_ptr(): w for w in session.executor.weights.values()}.values()
    return LocalRunner([session], Mapping()), sum(w.numel() * w.element_size() for w in held)


def hf_generator(hf, compiled: bool) -> Callable[[list[list[int]], int], list[list[int]]]:
    """``(prompts, n) -> new tokens`` through transformers' ``generate`` (eager, or static cache + compile)."""
    from transformers import CompileConfig

    extra: dict[str, Any] = {}
    if compiled:
        extra = {"cache_implementation": "static", "compile_config": CompileConfig(mode="default")}
    else:
        extra = {"disable_compile": True}

    def run(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=hf.device)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
        return out[:, ids.shape[1] :].tolist()

    return run


def modelc_generator(runner) -> Callable[[list[list[int]], int], list[list[int]]]:
    from compiler_core.runtime.generation import GenerationConfig, generate

    return lambda prompts, n: [beams[0] for beams in generate(runner, prompts, GenerationConfig(n))]


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode_speed(gen, prompts: list[list[int]], args) -> dict[str, float]:
    """Best and worst decode tokens/s over ``args.repeat`` pairs of runs (1 and N new tokens)."""
    gen(prompts, args.new_tokens)  # warm-up at full length: allocation, capture, compilation, cache sizing
    gen(prompts, 1)
    rates = []
    for _ in range(args.repeat):
        t1 = timed(lambda: gen(prompts, 1), args.device)
        tn = timed(lambda: gen(prompts, args.new_tokens), args.device)
        # On a loaded host the longer run can come out faster: that pair measures nothing.
        rates.append(len(prompts) * (args.new_tokens - 1) / (tn - t1) if tn > t1 else float("nan"))
    valid = [r for r in rates if r == r] or [float("nan")]
    return {"tok_s": max(valid), "worst_tok_s": min(valid)}


def prompt_lengths(spec: str) -> list[int]:
    """``--prefill_len``'s prompt lengths: comma-separated positive integers, or 0 / empty for none."""
    try:
        lengths = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {spec!r}") from None
    if any(n < 0 for n in lengths):
        raise argparse.ArgumentTypeError(f"a negative prompt length in {spec!r}")
    return [n for n in lengths if n > 0]


def prefill_ms(gen, vocab: int, length: int, args) -> dict[str, float]:
    """Time to the first token of one ``length``-token prompt, in ms: its first pass, then the best
    and worst of ``--repeat`` after an untimed second one (modelc captures a prompt shape's CUDA
    graph at its second use, so the repeats are replays)."""
    prompt = torch.randint(100, vocab, (1, length), generator=torch.Generator().manual_seed(7)).tolist()
    first = 1e3 * timed(lambda: gen(prompt, 1), args.device)
    gen(prompt, 1)
    times = [1e3 * timed(lambda: gen(prompt, 1), args.device) for _ in range(args.repeat)]
    return {"ms": min(times), "worst_ms": max(times), "first_ms": first}


def measure_side(name: str, gen, weight_bytes: int, vocab: int, args) -> dict[str, Any]:
    row: dict[str, Any] = {"side": name, "weight_bytes": weight_bytes, "decode": {}}
    batches = [int(b) for b in args.batch.split(",")]
    if name == "hf_compiled":
        batches = [b for b in batches if b in {int(c) for c in args.compiled_batch.split(",")}]
    for batch in batches:
        prompts = torch.randint(100, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        row["decode"][batch] = decode_speed(gen, prompts.tolist(), args)
        print(f"#   {name} batch {batch}: {row['decode'][batch]['tok_s']:.1f} tok/s", flush=True)
    if name != "hf_compiled":  # a new prompt length would recompile it
        row["prefill"] = {length: prefill_ms(gen, vocab, length, args) for length in args.prefill_len}
    return row


def build_side(registry: Registry, name: str, hf, model, args, made: dict[str, Any]):
    """(generator, weight bytes) of side ``name``; the models are made here so each can fail alone.

    ``made`` keeps each quantized model for the sides that share it (``int4_awq`` and ``int4_awq_no_triton``).
    """
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    if name in ("hf_eager", "hf_compiled"):
        return hf_generator(hf, name == "hf_compiled"), hf_bytes
    qformat = name.removesuffix(NO_TRITON)
    if qformat not in made:
        made[qformat] = (
            model if qformat == "bf16" else quantized(registry, model, qformat, args.device, hf.config.vocab_size)
        )
    previous = os.environ.get("MODELC_TRITON")
    if name.endswith(NO_TRITON):
        os.environ["MODELC_TRITON"] = "0"  # read by the lowerings, while the engine is built
    try:
        runner, weight_bytes = engine(registry, made[qformat], args.device)
    finally:
        if previous is None:
            os.environ.pop("MODELC_TRITON", None)
        else:
            os.environ["MODELC_TRITON"] = previous
    return modelc_generator(runner), weight_bytes


def gemm_time_us(fn: Callable[[], Any], iters: int = 40) -> tuple[float, float]:
    """(best, worst) microseconds per call of ``fn`` over 5 replays of a CUDA graph of ``iters`` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / iters)
    return min(times), max(times)


def rotating(fns: list[Callable[[], Any]]) -> Callable[[], Any]:
    """A call that runs the next of ``fns`` each time (captured into a graph, the rotation is replayed)."""
    calls = iter(range(1 << 30))
    return lambda: fns[next(calls) % len(fns)]()


def linear_kernels(x, dense, fp8, w_scale, x_scale, prepared, tiny) -> dict[str, list[Callable[[], Any]]]:
    """label -> one call per weight copy, of every kernel compared in the per-linear table."""
    from compiler_core.backends.torch.cuda.fp8_gemm import fp8_linear
    from compiler_core.backends.torch.cuda.int4_gemm import int4_linear
    from modelc_plugins.quant_fp8 import numerics

    def scaled_mm(w):
        xq = numerics.quantize(x, x_scale)
        return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)

    kernels = {
        "bf16 F.linear": [lambda w=w: torch.nn.functional.linear(x, w) for w in dense],
        "fp8 triton (fused quant)": [lambda w=w: fp8_linear(x, w, w_scale, x_scale) for w in fp8],
        "fp8 quant + _scaled_mm": [lambda w=w: scaled_mm(w) for w in fp8],
        "int4 triton": [lambda w=w: int4_linear(x, w) for w in prepared],
    }
    if all(t is not None for t in tiny):
        kernels["int4 tinygemm"] = [lambda t=t: t(x) for t in tiny]
    return kernels


def gemm_rows(model, args) -> list[dict[str, Any]]:
    """Per-linear kernel times (CUDA graphs, weights rotated past the L2) at each ``--gemm_rows`` M."""
    from compiler_core.backends.torch.cuda.int4_gemm import prepare_int4_weight
    from compiler_core.backends.torch.fused.int4 import tinygemm_matmul
    from modelc_plugins.quant_awq.int4 import pack_int4, quantize_groups
    from modelc_plugins.quant_fp8 import numerics

    c = model.config.model
    hidden, hd, nh, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_kv_heads"]
    linears = {
        "qkv": ((nh + 2 * nkv) * hd, hidden),
        "dense": (hidden, nh * hd),
        "fc": (c["ffn_hidden_size"], hidden),
        "proj": (hidden, c["ffn_hidden_size"]),
    }
    rows = []
    device = torch.device(args.device)
    for name, (out, inp) in linears.items():
        copies = max(1, -(-(256 << 20) // (2 * out * inp)))  # > 4x the L2 in bf16 weights per rotation
        dense = [torch.randn(out, inp, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w_scale = numerics.scale_from_amax(dense[0].float().abs().max()).to(device).reshape(())
        x_scale = torch.tensor(4.0 / 448, device=device)
        fp8 = [numerics.quantize(w, w_scale) for w in dense]
        int4 = []
        for w in dense:
            codes, scales = quantize_groups(w, 128, scale_dtype=torch.bfloat16)
            int4.append((pack_int4(codes), scales))
        prepared = [prepare_int4_weight(p, s, 128) for p, s in int4]
        tiny = [tinygemm_matmul(p, s, 128, name) for p, s in int4]
        for m in (int(r) for r in args.gemm_rows.split(",")):
            x = torch.randn(m, inp, device=device, dtype=torch.bfloat16)
            kernels = linear_kernels(x, dense, fp8, w_scale, x_scale, prepared, tiny)
            row: dict[str, Any] = {"linear": f"{name} [{out}x{inp}]", "m": m}
            for label, fns in kernels.items():
                try:
                    row[label] = gemm_time_us(rotating(fns))
                except Exception as exc:  # a kernel this GPU cannot run is reported, not fatal
                    row[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            print("#   " + " | ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    return rows


def gemm_table(rows: list[dict[str, Any]]) -> str:
    labels = [k for k in rows[0] if k not in ("linear", "m")]
    head = "| linear | M |" + "".join(f" {label} us |" for label in labels)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[k][0]:.1f}" if isinstance(r.get(k), tuple) else str(r.get(k, "-")) for k in labels]
        lines.append(f"| {r['linear']} | {r['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    batches = [int(b) for b in result["args"]["batch"].split(",")]
    bandwidth = result["copy_bandwidth"]
    bf16 = next((r for r in result["rows"] if r["side"] == "bf16" and "decode" in r), None)
    head = "| side | weights GiB | floor steps/s |"
    head += "".join(f" batch {b} tok/s (worst) |" for b in batches)
    lengths = result["prefill_lengths"]
    head += " vs bf16 at batch 1 |" + "".join(f" prefill {n} ms (worst; first pass) |" for n in lengths)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['side']} | failed: {r['error']} |")
            continue
        line = f"| {r['side']} | {r['weight_bytes'] / 2**30:.2f} | {bandwidth / r['weight_bytes']:.0f} |"
        for b in batches:
            d = r["decode"].get(b)
            line += f" {d['tok_s']:.1f} ({d['worst_tok_s']:.1f}) |" if d else " - |"
        ratio = bf16 and 1 in r["decode"] and 1 in bf16["decode"]
        line += f" {r['decode'][1]['tok_s'] / bf16['decode'][1]['tok_s']:.2f}x |" if ratio else " - |"
        for n in lengths:
            p = r.get("prefill", {}).get(n)
            line += f" {p['ms']:.1f} ({p['worst_ms']:.1f}; {p['first_ms']:.1f}) |" if p else " - |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: 7b on CUDA, tiny on CPU")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--compiled_batch", default="1", help="batch sizes of the hf_compiled side")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument(
        "--prefill_len", type=prompt_lengths, default="128,1024", help="comma-separated prompt lengths; 0: no prefill"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help=f"comma-separated, of {','.join(SIDES)}; a modelc side + '{NO_TRITON}': built without Triton kernels",
    )
    parser.add_argument("--gemm_rows", default="1,8,32", help="M of the per-linear kernel table (CUDA); '' for none")
    parser.add_argument("--json", type=Path, default=Path("gpu_decode.json"))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")

    import transformers

    registry, hf, model = bench_model(args)
    shape, dtype = args.shape, model_dtype(args.device)
    card = torch.cuda.get_device_name(args.device) if cuda else (platform.processor() or platform.machine())
    result: dict[str, Any] = {
        "shape": shape,
        "config": {k: getattr(hf.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        "dtype": str(dtype).removeprefix("torch."),
        "device": card,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "args": {k: str(v) for k, v in vars(args).items()},
        "prefill_lengths": args.prefill_len,
        "copy_bandwidth": copy_bandwidth(args.device),
        "rows": [],
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    print(
        f"# {shape} Falcon {result['config']} {result['dtype']} on {card}; {result['versions']}; prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeat}; copy traffic "
        f"{result['copy_bandwidth'] / 1e9:.0f} GB/s",
        flush=True,
    )
    if cuda and args.gemm_rows:
        try:
            result["gemms"] = gemm_rows(model, args)
            print(gemm_table(result["gemms"]), flush=True)
        except Exception as exc:  # the per-linear table is an aside: the decode table still runs
            result["gemms_error"] = f"{type(exc).__name__}: {exc}"
            print(f"# per-linear table failed: {result['gemms_error']}", flush=True)
        args.json.write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()
    made: dict[str, Any] = {}
    for name in args.sides.split(","):
        start = time.perf_counter()
        try:
            gen, weight_bytes = build_side(registry, name, hf, model, args, made)
            row = measure_side(name, gen, weight_bytes, hf.config.vocab_size, args)
        except Exception as exc:  # one side failing (a compile error, say) still reports the others
            row = {"side": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        row["seconds"] = time.perf_counter() - start
        result["rows"].append(row)
        args.json.write_text(json.dumps(result, indent=1))  # what is measured so far survives a timeout
        print(f"# {name}: {row.get('error', 'done')} in {row['seconds']:.0f} s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if result.get("gemms"):
        print(gemm_table(result["gemms"]))
    print(table(result))


if __name__ == "__main__":
    main()
