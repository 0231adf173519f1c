"""What the torch backend's fused patterns buy over lowering a quantized linear's decomposition
node by node (quantize / dequantize / matmul primitives, the weight dequantized on every call).

One ``fp8_linear`` and one ``awq_linear`` (group size 128, ragged when the input dim asks for it)
of the chosen shape, run by the executor with the loaded plugins' lowering table and with the
same table minus its fused patterns; prints the best time per call at a few row counts and the
largest difference between the two outputs.

    python bench/bench_lowering.py                          # CPU, 1024 x 1024, float32
    python bench/bench_lowering.py --out 4544 --in 4544     # falcon-7b's dense layer
    python bench/bench_lowering.py --device cuda --dtype bfloat16 --out 4544 --in 4544
"""

from __future__ import annotations

import argparse
import platform

import torch
from common import best_time

from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.formats.int4 import pack_int4
from compiler_core.host import load_registry
from compiler_core.ir import GraphBuilder, validate
from compiler_core.lowering import FusedPattern, LoweringTable
from compiler_core.registry import Registry
from compiler_core.runtime.context import ForwardContext


def one_linear(registry: Registry, op: str, params: dict[str, tuple[list[int], str]], dtype: str, **attrs):
    g = GraphBuilder("one")
    roles = {role: g.param(f"fc.{role}", shape, pdtype) for role, (shape, pdtype) in params.items()}
    y = g.add(op, ["x"], name="fc", params=roles, **attrs)
    return validate(g.build(["x"], [y], attrs={"dtype": dtype}), registry.ops)


def fp8_layer(registry: Registry, out: int, inp: int, dtype: str, device: str):
    params = {"weight": ([out, inp], "float8_e4m3fn"), "weights_scaling_factor": ([1], "float32")}
    params["activation_scaling_factor"] = ([1], "float32")
    weights = {
        "fc.weight": (torch.randn(out, inp) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
        "fc.weights_scaling_factor": torch.tensor([2e-4]),
        "fc.activation_scaling_factor": torch.tensor([4.0 / 448]),
    }
    return one_linear(registry, "fp8_linear", params, dtype), {k: v.to(device) for k, v in weights.items()}


def awq_layer(registry: Registry, out: int, inp: int, dtype: str, device: str, group: int = 128):
    groups = -(-inp // group)
    params = {"weight": ([out, inp // 2], "int8"), "weights_scaling_factor": ([out, groups], dtype)}
    weights = {
        "fc.weight": pack_int4(torch.randint(-8, 8, (out, inp), dtype=torch.int8)),
        "fc.weights_scaling_factor": (torch.rand(out, groups) * 0.01).to(getattr(torch, dtype)),
    }
    layer = one_linear(registry, "awq_linear", params, dtype, group_size=group)
    return layer, {k: v.to(device) for k, v in weights.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=1024)
    parser.add_argument("--in", dest="inp", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="1,16,128", help="comma-separated tokens per call")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    registry = load_registry()
    table = registry.lowerings
    unfused = LoweringTable([e for e in table.entries() if not isinstance(e, FusedPattern)])
    print(f"# {platform.node()}: torch {torch.__version__}, {args.device}, {args.dtype}, [{args.out} x {args.inp}]")
    print("| layer | rows | fused pattern | fused ms | node by node ms | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, layer in (("fp8_linear", fp8_layer), ("awq_linear", awq_layer)):
            graph, weights = layer(registry, args.out, args.inp, args.dtype, args.device)
            fused = GraphExecutor(registry, graph, weights, args.device, lowerings=table)
            plain = GraphExecutor(registry, graph, weights, args.device, lowerings=unfused)
            pattern = ", ".join(s.fused.name for s in fused.steps if s.fused) or "none"
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(1, rows, args.inp, device=args.device).to(getattr(torch, args.dtype))
                ctx = ForwardContext.for_prompt(torch.ones(1, rows, dtype=torch.long, device=args.device))
                times, outs = [], []
                for executor in (fused, plain):
                    seconds, result = best_time(
                        lambda e=executor, x=x, ctx=ctx: e.run({"x": x}, ctx), args.repeat, args.device
                    )
                    times.append(seconds * 1e3)
                    outs.append(result["fc.out"].float())
                diff = float((outs[0] - outs[1]).abs().max())
                print(
                    f"| {name} | {rows} | {pattern} | {times[0]:.3f} | {times[1]:.3f} | "
                    f"{times[1] / times[0]:.2f}x | {diff:.2e} |"
                )


if __name__ == "__main__":
    main()
