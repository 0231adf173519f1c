"""Decode speed of the torch backend beside transformers' ``generate``, same weights, same prompts.

A random-weight Falcon is made in memory (no files, nothing downloaded): ``--shape small`` is a
small Falcon-7B-style model (hidden 1024, 8 layers, 16 query heads, one KV head, vocab 65024),
``--shape 7b`` has falcon-7b's real dimensions (hidden 4544, 32 layers, 71 heads, MQA), and
``--shape overhead`` is 8 layers of hidden 128 (its step time is the host's per-step work). The
model is created directly on the device in ``--dtype`` (default: bfloat16 on CUDA, float32 on CPU).
``--weights bf16-valued`` rounds every random weight to a bfloat16 number first, which is what a
float32 load of a published (bfloat16) Falcon checkpoint holds; the engine then keeps such weights
as bfloat16 on CPU and multiplies them in float32 (``MODELC_BF16_WEIGHTS=0`` turns that off). The same
tensors feed both sides: HF's ``FalconForCausalLM`` (SDPA attention) and this project's engine
graph run by ``generate()`` (the IR weights are views of HF's where the layout allows).

For each batch size, after one warm-up call, both sides are timed (best of ``--repeat``):

    prefill ms      generate with 1 new token (the prompt's forward pass + one argmax)
    decode tok/s    batch x (N - 1) / (time(N new tokens) - time(1 new token))

On CUDA the engine's decode steps replay a CUDA graph; a third column times the same engine
without graphs (on CPU, ``MODELC_ONEDNN_LINEAR=0`` shows the engine with BLAS linears). Greedy
tokens of all sides are compared (printed as "tokens equal"). The header also gives the
memory-bandwidth floor, the decode steps/s of an implementation that did nothing per step but
read every weight once (batch-1 decode is bound by it; larger batches reuse each weight read for
every row), at two measured rates: a large copy's traffic, and a read-only float32 sum.

    python bench/bench_decode.py                               # CPU, small shape, batch 1 and 8
    python bench/bench_decode.py --device cuda --shape 7b      # GPU, falcon-7b dims, bf16
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch
from common import copy_bandwidth, make_hf, read_bandwidth, shapes, timed

SHAPES = shapes("overhead", "small", "7b")


def make_models(shape: str, dtype: torch.dtype, device: str, bf16_valued: bool = False):
    """(HF model, our runner) over the same random weights, both on ``device``."""
    from compiler_core.convert.from_hf import LoadedModel, map_tensors, rank_weights
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.host import load_registry
    from compiler_core.mapping import Mapping
    from compiler_core.model import rank_graph
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.runtime.session import TorchSession

    hf, hf_config = make_hf(shape, dtype, device)
    if bf16_valued:
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.to(torch.bfloat16))

    hf_dict = hf_config.to_dict()
    registry = load_registry()
    arch = registry.architecture_for_hf(hf_dict, "bench")
    dtype_name = str(dtype).removeprefix("torch.")
    config = CheckpointConfig.from_model_fields(arch.config_from_hf(hf_dict), dtype_name, Mapping(), "bench")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    model = LoadedModel(config, dict(map_tensors(arch, config, state.items(), "bench")))
    session = TorchSession(registry, rank_graph(registry, config, 0), rank_weights(registry, model, 0), device)
    return hf, LocalRunner([session], Mapping()), hf_config


def measure(hf, runner, batch: int, args, clock) -> dict[str, Any]:
    """Prefill and decode speed of both sides; runs alternate so that load spikes hit both alike."""
    from compiler_core.runtime.generation import GenerationConfig, generate

    torch.manual_seed(batch)
    prompts = torch.randint(100, hf.config.vocab_size, (batch, args.prompt_len)).tolist()
    ids = torch.tensor(prompts, device=args.device)
    mask = torch.ones_like(ids)

    def ours(n: int):
        return [beams[0] for beams in generate(runner, prompts, GenerationConfig(n))]

    def theirs(n: int):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, args.prompt_len :].tolist()

    def ours_without_graphs(n: int):
        session = runner.sessions[0]
        session.decode_mode = "dynamic"
        try:
            return ours(n)
        finally:
            session.decode_mode = "graph"

    sides = {"ours": ours, "hf": theirs}
    if runner.sessions[0].decode_mode == "graph":
        sides["eager"] = ours_without_graphs
    for fn in sides.values():
        fn(2)  # warm-up: allocation, kernel selection, lazy initialisation
    best = {name: [float("inf"), float("inf")] for name in sides}
    tokens = {}
    for _ in range(args.repeat):
        for name, fn in sides.items():
            t1, _ = timed(lambda fn=fn: fn(1), args.device, clock)
            tn, tokens[name] = timed(lambda fn=fn: fn(args.new_tokens), args.device, clock)
            best[name][0] = min(best[name][0], t1)
            best[name][1] = min(best[name][1], tn)
    row: dict[str, Any] = {"batch": batch}
    for name, (t1, tn) in best.items():
        row[f"{name}_prefill_ms"] = 1000 * t1
        row[f"{name}_decode_tps"] = batch * (args.new_tokens - 1) / (tn - t1)
    row["speedup"] = row["ours_decode_tps"] / row["hf_decode_tps"]
    row["tokens_equal"] = all(t == tokens["hf"] for t in tokens.values())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--weights",
        default="random",
        choices=["random", "bf16-valued"],
        help="bf16-valued: round the random weights to bfloat16 numbers, as a published checkpoint's are",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="process: CPU time of this process (with --threads 1 on a shared, loaded host it counts only the "
        "time this process ran; wall time there includes waiting for a core)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    import transformers

    hf, runner, config = make_models(args.shape, dtype, args.device, args.weights == "bf16-valued")
    params = sum(p.numel() for p in hf.parameters())
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(
        f"# {args.shape} Falcon (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, MQA, {params / 1e6:.0f}M params, {str(dtype).removeprefix('torch.')}) "
        f"on {args.device} ({where or platform.machine()}, {torch.get_num_threads()} threads); "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeat}; {args.weights} weights"
    )
    # Each decode step reads every weight once; at the copy's memory traffic rate that alone takes
    # weight_bytes / bandwidth, so no implementation decodes a batch-1 token faster than this.
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    resident = runner.sessions[0].executor.weights.values()
    engine_bytes = sum(w.numel() * w.element_size() for w in {w.data_ptr(): w for w in resident}.values())
    bandwidth, reading = copy_bandwidth(args.device, clock), read_bandwidth(args.device, clock)
    print(
        f"# weights {weight_bytes / 2**20:.0f} MiB (the engine holds {engine_bytes / 2**20:.0f} MiB); "
        f"copy traffic {bandwidth / 1e9:.1f} GB/s, "
        f"read-only sum {reading / 1e9:.1f} GB/s; weight-read floor: {bandwidth / weight_bytes:.1f} decode steps/s "
        f"at copy traffic, {reading / weight_bytes:.1f} at the sum's rate; clock: {args.clock}"
    )
    graphs = runner.sessions[0].decode_mode == "graph"
    header = "| batch | HF prefill ms | modelc prefill ms | HF decode tok/s | modelc decode tok/s |"
    header += " modelc without CUDA graphs tok/s |" if graphs else ""
    header += " speedup | tokens equal |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch in (int(b) for b in args.batch.split(",")):
        r = measure(hf, runner, batch, args, clock)
        line = (
            f"| {batch} | {r['hf_prefill_ms']:.1f} | {r['ours_prefill_ms']:.1f} | {r['hf_decode_tps']:.1f} | "
            f"{r['ours_decode_tps']:.1f} |"
        )
        line += f" {r['eager_decode_tps']:.1f} |" if graphs else ""
        line += f" {r['speedup']:.2f}x | {'yes' if r['tokens_equal'] else 'NO'} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
