"""INT4-AWQ beside full precision: quantization time, weight bytes and decode speed, one table.

A random-weight Falcon is made in memory (nothing downloaded; the shapes are bench_decode.py's:
``--shape small`` is a Falcon-7B-style model with hidden 1024 and 8 layers, ``--shape 7b`` has
falcon-7b's real dimensions), in ``--dtype`` (default: bfloat16 on CUDA, float32 on CPU). Then:

    quantize   int4_awq on random calibration tokens (--calib_size blocks of --calib_len), timed:
               calibration forward, AWQ scale search, clip search and packing
    engines    HF FalconForCausalLM (SDPA) | modelc full precision | modelc int4_awq,
               all on --device, the same weights

For each batch size (best of --repeat, after a warm-up) the table shows prefill ms and decode
tokens/s (batch x (N - 1) / (time(N new tokens) - time(1 new token))); the header gives each
engine's resident weight bytes and, on CUDA, the table the memory-bandwidth floor (weight bytes /
measured read bandwidth: the batch-1 decode tokens/s of a step that only reads its weights
once). On a CPU the int4 kernels dequantize once at load, so CPU decode reads full-precision
weights and shows only the quantization's overhead, not its bandwidth saving. The header also
gives the relative error and top-1 agreement of int4_awq's prompt logits against modelc's
full-precision engine (random weights with near-flat next-token distributions: a sanity check
that the quantized engine computes the same model, not an accuracy figure).

    python bench/bench_awq.py                                   # CPU, small shape, float32
    python bench/bench_awq.py --device cuda --shape 7b          # GPU, falcon-7b dims, bfloat16

On CUDA, bfloat16 decode uses PyTorch's int4 GEMM (see compiler_core/backends/torch/fused/int4.py);
other dtypes and prefill dequantize per call. falcon-7b's hidden size 4544 is not a multiple of 128: its
last group holds 64 channels (the int4 GEMM pads it to a whole group).
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch
from common import best_time, copy_bandwidth, make_hf, shapes, sync

#: bench_decode.py's shapes: a small Falcon-7B-style model and falcon-7b's real dimensions.
SHAPES = shapes("small", "7b")


def loaded_model(hf, dtype: torch.dtype):
    """The HF model's weights as a modelc LoadedModel (IR names, tp1)."""
    from compiler_core.convert.from_hf import LoadedModel, map_tensors
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.host import load_registry
    from compiler_core.mapping import Mapping

    hf_dict = hf.config.to_dict()
    arch = load_registry().architecture_for_hf(hf_dict, "bench")
    dtype_name = str(dtype).removeprefix("torch.")
    config = CheckpointConfig.from_model_fields(arch.config_from_hf(hf_dict), dtype_name, Mapping(), "bench")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    return LoadedModel(config, dict(map_tensors(arch, config, state.items(), "bench")))


def runner_of(model, device: str):
    from compiler_core.convert.from_hf import rank_weights
    from compiler_core.host import load_registry
    from compiler_core.mapping import Mapping
    from compiler_core.model import rank_graph
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.runtime.session import TorchSession

    registry = load_registry()
    graph = rank_graph(registry, model.config, 0)
    session = TorchSession(registry, graph, rank_weights(registry, model, 0), device)
    weight_bytes = sum(w.numel() * w.element_size() for w in session.executor.weights.values())
    return LocalRunner([session], Mapping()), weight_bytes


def quantize_awq(model, args) -> tuple[Any, float]:
    """int4_awq of ``model`` (its weights dict is copied, not changed) and the seconds it took."""
    from compiler_core.convert.from_hf import LoadedModel
    from compiler_core.host import load_registry
    from compiler_core.quantize.calibration import CalibrationBatch, CalibrationSet
    from modelc_plugins.quant_awq.scheme import Int4AwqScheme

    gen = torch.Generator().manual_seed(1)
    batches = tuple(
        CalibrationBatch(ids, torch.ones_like(ids))
        for ids in torch.randint(100, 60000, (args.calib_size, 1, args.calib_len), generator=gen)
    )
    copy = LoadedModel(model.config, dict(model.weights))
    options = {
        "group_size": args.group_size,
        "awq_max_tokens": args.awq_max_tokens,
        "device": args.device,
        "show_progress": False,
        "registry": load_registry(),
    }
    sync(args.device)
    start = time.perf_counter()
    quantized = Int4AwqScheme().quantize(copy, CalibrationSet(batches, "random tokens"), options)
    sync(args.device)
    return quantized, time.perf_counter() - start


def measure(engines: dict[str, Any], hf, batch: int, args) -> dict[str, Any]:
    from compiler_core.runtime.generation import GenerationConfig, generate

    torch.manual_seed(batch)
    prompts = torch.randint(100, 60000, (batch, args.prompt_len)).tolist()
    ids = torch.tensor(prompts, device=args.device)
    mask = torch.ones_like(ids)

    def hf_generate(n: int):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, args.prompt_len :].tolist()

    sides = {"hf": hf_generate}
    for name, runner in engines.items():
        sides[name] = lambda n, runner=runner: generate(runner, prompts, GenerationConfig(n))
    row: dict[str, Any] = {"batch": batch}
    for name, fn in sides.items():
        fn(2)  # warm-up: allocation, kernel selection, lazy initialisation
        t1, _ = best_time(lambda fn=fn: fn(1), args.repeat, args.device)
        tn, _ = best_time(lambda fn=fn: fn(args.new_tokens), args.repeat, args.device)
        row[f"{name}_prefill_ms"] = 1000 * t1
        row[f"{name}_decode_tps"] = batch * (args.new_tokens - 1) / (tn - t1)
    return row


def prompt_logits_agreement(fp_runner, awq_runner, args) -> tuple[float, float]:
    """(relative error, top-1 agreement) of int4_awq's prompt logits against full precision."""
    from compiler_core.runtime.context import positions_from_mask

    torch.manual_seed(0)
    ids = torch.randint(100, 60000, (2, args.prompt_len), device=args.device)
    mask = torch.ones_like(ids)
    out = []
    for runner in (fp_runner, awq_runner):
        runner.allocate(2, args.prompt_len)
        with torch.inference_mode():
            out.append(runner.logits(ids, positions_from_mask(mask), mask, 0).float())
    ref, awq = out
    rel = ((awq - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()).item()
    return rel, (awq.argmax(-1) == ref.argmax(-1)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calib_size", type=int, default=16, help="calibration blocks")
    parser.add_argument("--calib_len", type=int, default=256, help="tokens per calibration block")
    parser.add_argument("--awq_max_tokens", type=int, default=2048, help="tokens each AWQ search is scored on")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    import transformers

    hf, config = make_hf(args.shape, dtype, args.device)
    model = loaded_model(hf, dtype)
    awq_model, quant_seconds = quantize_awq(model, args)
    fp_runner, fp_bytes = runner_of(model, args.device)
    awq_runner, awq_bytes = runner_of(awq_model, args.device)
    rel_error, top1 = prompt_logits_agreement(fp_runner, awq_runner, args)
    params = sum(p.numel() for p in hf.parameters())
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"# {args.shape} Falcon (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, MQA, {params / 1e6:.0f}M params, {dtype_name}) on {args.device} "
        f"({where or platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}, "
        f"transformers {transformers.__version__}; int4_awq group {args.group_size}; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, best of {args.repeat}"
    )
    print(
        f"# int4_awq quantization: {quant_seconds:.1f} s ({args.calib_size} x {args.calib_len} calibration tokens, "
        f"searches scored on {args.awq_max_tokens}); weights: {dtype_name} {fp_bytes / 2**20:.0f} MiB, "
        f"int4_awq {awq_bytes / 2**20:.0f} MiB ({fp_bytes / awq_bytes:.2f}x less); prompt logits vs {dtype_name}: "
        f"relative error {rel_error:.3f}, top-1 agreement {top1:.0%}"
    )
    floors = None
    if args.device.startswith("cuda"):
        # The design's floor: weight bytes / measured copy traffic (bytes read + written), as bench_decode.
        traffic = copy_bandwidth(args.device)
        floors = (traffic / fp_bytes, traffic / awq_bytes)
    header = (
        f"| batch | HF prefill ms | {dtype_name} prefill ms | int4_awq prefill ms | HF decode tok/s | "
        f"{dtype_name} decode tok/s | int4_awq decode tok/s | int4_awq vs {dtype_name} |"
    )
    if floors is not None:
        header += f" floor {dtype_name} tok/s | floor int4_awq tok/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    engines = {"fp": fp_runner, "awq": awq_runner}
    for batch in (int(b) for b in args.batch.split(",")):
        r = measure(engines, hf, batch, args)
        line = (
            f"| {batch} | {r['hf_prefill_ms']:.1f} | {r['fp_prefill_ms']:.1f} | {r['awq_prefill_ms']:.1f} | "
            f"{r['hf_decode_tps']:.1f} | {r['fp_decode_tps']:.1f} | {r['awq_decode_tps']:.1f} | "
            f"{r['awq_decode_tps'] / r['fp_decode_tps']:.2f}x |"
        )
        if floors is not None:
            line += f" {floors[0]:.0f} | {floors[1]:.0f} |"
        print(line, flush=True)
    sync(args.device)


if __name__ == "__main__":
    main()
