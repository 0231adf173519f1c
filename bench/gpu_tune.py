"""Tuning sweep of the Triton INT4 and FP8 GEMMs' launch parameters, for tiling.TABLE.

For falcon-7b's four linears (qkv 4672x4544, dense 4544x4544, fc 18176x4544, proj 4544x18176;
random weights, bfloat16 activations) and each M of ``--rows``, the INT4 GEMM (group 128) and the
FP8 GEMM (static per-tensor scales) are timed at candidate launch configurations (tile shape,
K tile, split-K, warps, stages) next to cuBLAS bf16 ``F.linear`` and, for FP8, quantization +
``torch._scaled_mm``. Every candidate is first checked against the reference on the same inputs
(failing or uncompilable configurations are skipped and counted).

The grid is searched coordinate-wise from the table's current row (each parameter in turn over
its values, the operand order together with the K tile, the others held at the best so far),
since the full product does not fit in a few minutes of compiles. Each (kernel, linear, M) gets
an equal share of what is left of ``--budget_s``; when it is spent the best so far is kept. The
winners of the two linears of a size class (``tiling.size_class``) are then timed on each other,
and the configuration with the least total time is suggested for that class. Times are
CUDA-graph replays rotating through weight copies larger than the L2 (as
``bench/gpu_decode.py``'s per-linear table).

It also times the INT4 prefill choice (``int4_linear`` against ``dequantize_int4`` + cuBLAS) at
128, 512 and 1024 rows.

    python bench/gpu_tune.py --json gpu_tune.json             # on the GPU (about 4 minutes)
    python bench/gpu_tune.py --device cpu --tiny --json t.json  # the script itself, under the interpreter

On a CPU (``--tiny``, Triton's interpreter) nothing is timed: the candidates are only checked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from compiler_core.testing import use_triton_interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: falcon-7b's linears: name -> (out, in), grouped by tiling.size_class.
FALCON_7B = {"qkv": (4672, 4544), "dense": (4544, 4544), "fc": (18176, 4544), "proj": (4544, 18176)}
#: Interpreter-sized stand-ins (a ragged last group of 16 in the 80-wide rows at group 32).
TINY = {"qkv": (40, 80), "dense": (24, 80)}
GROUP, TINY_GROUP = 128, 32
#: Values each parameter is searched over (the table's current value is tried first). A tuple of
#: names is searched jointly over the product of its values, for pairs that interact: the operand
#: order and the K tile (at qkv, 32 rows, the weight-left form won only with another K tile, which
#: a one-by-one search never reached), and the column tile and the warps (a 256-column tile needs
#: 8 warps to hold its accumulator; it reads each activation tile for 4x the weight columns of a
#: 64-column one, which matters from a few dozen rows on).
ORDER_AND_K = ("swap_ab", "block_k")
TILE_AND_WARPS = ("block_n", "num_warps")
#: The split and, for the automatic one (0), its programs per multiprocessor (a fixed split keeps
#: the default aim, which it does not use).
SPLIT = ("split_k", "programs_per_sm")
SEARCH: dict[str, dict[str | tuple[str, ...], tuple[Any, ...]]] = {
    "int4": {
        ORDER_AND_K: tuple(itertools.product((False, True), (0, 128, 256, 64))),
        TILE_AND_WARPS: tuple(itertools.product((64, 32, 128, 256), (4, 8))),
        SPLIT: ((0, 4), (0, 2), (0, 8), *((split, 4) for split in (1, 2, 4, 8, 16))),
        "num_stages": (3, 4, 2, 5),
    },
    "fp8": {
        ORDER_AND_K: tuple(itertools.product((False, True), (128, 256, 64))),
        TILE_AND_WARPS: tuple(itertools.product((64, 32, 128, 256), (4, 8))),
        SPLIT: ((0, 4), (0, 2), (0, 8), *((split, 4) for split in (1, 2, 4, 8, 16))),
        "num_stages": (3, 4, 2, 5),
    },
}
TINY_SEARCH = {
    "int4": {ORDER_AND_K: tuple(itertools.product((False, True), (0, 16, 64)))},
    "fp8": {ORDER_AND_K: tuple(itertools.product((False, True), (32, 64)))},
}
#: Relative error (Frobenius) a candidate may have against the float32 reference: bfloat16 outputs
#: are rounded once from a float32 accumulator (see tests/gpu/test_kernels.py).
TOLERANCE = 1e-2
#: Bytes of weights per rotation: well beyond an H200's 60 MiB L2, so every call reads HBM.
ROTATION_BYTES = 256 << 20


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


class Linear:
    """One linear's weights (copies for the rotation), probe activations and references."""

    def __init__(self, name: str, out: int, inp: int, group: int, device: torch.device, copies_of: int) -> None:
        from compiler_core.backends.torch.cuda.int4_gemm import prepare_int4_weight
        from compiler_core.backends.torch.fused.int4 import dequantize_in_dtype
        from modelc_plugins.quant_fp8 import numerics

        self.name, self.out, self.inp, self.device = name, out, inp, device
        gen = torch.Generator(device=device).manual_seed(out * 7 + inp)
        copies = max(1, min(copies_of, -(-ROTATION_BYTES // (out * inp // 2))))
        dense_copies = max(1, min(copies_of, -(-ROTATION_BYTES // (2 * out * inp))))
        # Random bytes are random pairs of codes in [-8, 7]; scales sized like a 0.02-std weight's.
        packed = [
            torch.randint(-128, 128, (out, inp // 2), generator=gen, device=device, dtype=torch.int8)
            for _ in range(copies)
        ]
        groups = -(-inp // group)
        scales = [(torch.rand(out, groups, generator=gen, device=device) * 0.004 + 0.002).bfloat16() for _ in packed]
        self.int4 = [prepare_int4_weight(p, s, group) for p, s in zip(packed, scales, strict=True)]
        self.int4_dense = dequantize_in_dtype(packed[0], scales[0], group, torch.bfloat16)
        self.dense = [
            torch.randn(out, inp, generator=gen, device=device).bfloat16() * 0.02 for _ in range(dense_copies)
        ]
        self.w_scale = numerics.scale_from_amax(self.dense[0].float().abs().max()).to(device).reshape(())
        self.x_scale = torch.tensor(4.0 / 448, device=device)
        fp8_copies = max(1, min(copies_of, -(-ROTATION_BYTES // (out * inp))))
        self.fp8 = [numerics.quantize(self.dense[i % len(self.dense)], self.w_scale) for i in range(fp8_copies)]
        self.x: dict[int, torch.Tensor] = {}
        self.want: dict[tuple[str, int], torch.Tensor] = {}

    def activation(self, m: int) -> torch.Tensor:
        if m not in self.x:
            gen = torch.Generator(device=self.device).manual_seed(m)
            self.x[m] = torch.randn(m, self.inp, generator=gen, device=self.device).bfloat16()
        return self.x[m]

    def reference(self, kernel: str, m: int) -> torch.Tensor:
        """float32 ``x @ W.T`` of the first weight copy (FP8: the quantized activation's product, scaled)."""
        from modelc_plugins.quant_fp8 import numerics

        if (kernel, m) not in self.want:
            x = self.activation(m)
            if kernel == "int4":
                want = x.float() @ self.int4_dense.float().T
            else:
                xq = numerics.quantize(x, self.x_scale).float()
                want = xq @ self.fp8[0].float().T * (self.x_scale * self.w_scale)
            self.want[kernel, m] = want
        return self.want[kernel, m]

    def calls(self, kernel: str, m: int, config) -> list[Callable[[], torch.Tensor]]:
        """One call per weight copy of ``kernel`` at ``config`` on the M-row activation."""
        from compiler_core.backends.torch.cuda.fp8_gemm import fp8_linear
        from compiler_core.backends.torch.cuda.int4_gemm import int4_linear

        x = self.activation(m)
        if kernel == "int4":
            return [lambda w=w: int4_linear(x, w, None, config) for w in self.int4]
        return [lambda w=w: fp8_linear(x, w, self.w_scale, self.x_scale, None, config) for w in self.fp8]

    def baselines(self, kernel: str, m: int) -> dict[str, list[Callable[[], torch.Tensor]]]:
        from modelc_plugins.quant_fp8 import numerics

        x = self.activation(m)
        out = {"bf16 F.linear": [lambda w=w: torch.nn.functional.linear(x, w) for w in self.dense]}
        if kernel == "fp8":

            def scaled_mm(w: torch.Tensor) -> torch.Tensor:
                xq = numerics.quantize(x, self.x_scale)
                return torch._scaled_mm(xq, w.t(), scale_a=self.x_scale, scale_b=self.w_scale, out_dtype=x.dtype)

            out["fp8 quant + _scaled_mm"] = [lambda w=w: scaled_mm(w) for w in self.fp8]
        return out


class Sweep:
    """Checked and timed configurations, cached by (kernel, linear, M, config)."""

    def __init__(self, timing: bool) -> None:
        self.timing = timing
        self.results: dict[tuple[str, str, int, Any], float | str] = {}
        self.skipped = 0

    def measure(self, linear: Linear, kernel: str, m: int, config) -> float | None:
        """µs per call of ``config`` (0.0 without timing), or None when it fails or disagrees."""
        key = (kernel, linear.name, m, config)
        if key not in self.results:
            self.results[key] = self._measure(linear, kernel, m, config)
            if isinstance(self.results[key], str):
                self.skipped += 1
        value = self.results[key]
        return None if isinstance(value, str) else value

    def _measure(self, linear: Linear, kernel: str, m: int, config) -> float | str:
        from gpu_decode import gemm_time_us, rotating

        calls = linear.calls(kernel, m, config)
        try:
            got = calls[0]()
            err = relative_error(got, linear.reference(kernel, m))
            if not err < TOLERANCE:  # NaN fails too
                return f"relative error {err:.3g}"
            return gemm_time_us(rotating(calls), iters=20)[0] if self.timing else 0.0
        except Exception as exc:  # an uncompilable or unlaunchable configuration is skipped
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


#: Row tiles a search starts from (16 is tl.dot's minimum); larger M start from the table's row.
ROW_TILES = (16, 32, 64, 128)


def block_m_of(m: int) -> int:
    """The row tile of M rows: the smallest of :data:`ROW_TILES` that holds them."""
    return next(b for b in ROW_TILES if m <= b)


def descend(sweep: Sweep, linear: Linear, kernel: str, m: int, start, search, deadline: float):
    """Coordinate search from ``start``: (best config, its µs), or (None, None) if nothing passed."""
    best, best_us = None, None
    us = sweep.measure(linear, kernel, m, start)
    if us is not None:
        best, best_us = start, us
    for field, values in search.items():
        for value in values:
            if time.perf_counter() > deadline:
                return best, best_us
            changes = dict(zip(field, value, strict=True)) if isinstance(field, tuple) else {field: value}
            candidate = replace(best or start, **changes)
            us = sweep.measure(linear, kernel, m, candidate)
            if us is not None and (best_us is None or us < best_us):
                best, best_us = candidate, us
    return best, best_us


def baseline_us(linear: Linear, kernel: str, m: int, timing: bool) -> dict[str, float | str]:
    from gpu_decode import gemm_time_us, rotating

    out: dict[str, float | str] = {}
    for label, calls in linear.baselines(kernel, m).items():
        try:
            out[label] = gemm_time_us(rotating(calls), iters=20)[0] if timing else 0.0
        except Exception as exc:  # a baseline this GPU cannot run is reported, not fatal
            out[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return out


def prefill_rows(linears: list[Linear], rows: tuple[int, ...], timing: bool) -> list[dict[str, Any]]:
    """Per linear and M: int4_linear (table config) vs dequantize_int4 + cuBLAS vs bf16 cuBLAS, in µs."""
    from gpu_decode import gemm_time_us, rotating

    from compiler_core.backends.torch.cuda.int4_gemm import dequantize_int4, int4_linear

    out = []
    for linear in linears:
        for m in rows:
            x = linear.activation(m)
            kernels = {
                "int4 triton": [lambda w=w, x=x: int4_linear(x, w) for w in linear.int4],
                "int4 dequant + cuBLAS": [
                    lambda w=w, x=x: torch.nn.functional.linear(x, dequantize_int4(w, x.dtype)) for w in linear.int4
                ],
                "bf16 F.linear": [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in linear.dense],
            }
            row: dict[str, Any] = {"linear": linear.name, "m": m}
            for label, calls in kernels.items():
                try:
                    got = calls[0]()
                    if label.startswith("int4"):
                        err = relative_error(got, linear.reference("int4", m))
                        if not err < TOLERANCE:
                            raise ValueError(f"relative error {err:.3g}")
                    row[label] = gemm_time_us(rotating(calls), iters=10)[0] if timing else 0.0
                except Exception as exc:  # reported in the row, not fatal
                    row[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            print(f"# prefill {row}", flush=True)
            out.append(row)
    return out


def config_literal(config) -> str:
    from compiler_core.backends.torch.cuda.tiling import PROGRAMS_PER_SM

    c = config
    swap = ", swap_ab=True" if c.swap_ab else ""
    aim = f", programs_per_sm={c.programs_per_sm}" if c.programs_per_sm != PROGRAMS_PER_SM else ""
    return f"Config({c.block_m}, {c.block_n}, {c.block_k}, {c.split_k}, {c.num_warps}, {c.num_stages}{swap}{aim})"


def sweep_class(
    sweep: Sweep, linears: list[Linear], kernels: list[str], rows: list[int], search, timing: bool, clock: dict
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Any]]:
    """Per-(kernel, linear, M) rows and the per-(kernel, M) configuration suggested for these linears."""
    from compiler_core.backends.torch.cuda.tiling import config_for

    out, suggested = [], {}
    for kernel in kernels:
        for m in rows:
            winners = []
            for linear in linears:
                clock["left"] -= 1
                share = (clock["end"] - time.perf_counter()) / max(1, clock["left"])
                table = config_for(kernel, m, linear.out, linear.inp)
                decode_sized = m <= ROW_TILES[-1]
                start = replace(table, block_m=block_m_of(m)) if decode_sized else table
                # Row tiles below the one that holds all M rows are tried last (more row blocks re-read the weight).
                smaller = tuple(b for b in ROW_TILES[:2] if b < start.block_m) if decode_sized else ()
                fields = {**search[kernel], "block_m": smaller}
                best, best_us = descend(sweep, linear, kernel, m, start, fields, time.perf_counter() + share)
                row = {
                    "kernel": kernel,
                    "linear": f"{linear.name} [{linear.out}x{linear.inp}]",
                    "m": m,
                    "best": asdict(best) if best else None,
                    "best_us": best_us,
                    "table": asdict(table),
                    "table_us": sweep.measure(linear, kernel, m, table),
                    **baseline_us(linear, kernel, m, timing),
                }
                text = " | ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items())
                print(f"# [{time.perf_counter() - clock['start']:.0f} s] {text}", flush=True)
                # Every candidate's time or failure, so that a search can be read, not only its winner.
                row["tried"] = {
                    config_literal(c): v
                    for (k, name, rows_of, c), v in sweep.results.items()
                    if (k, name, rows_of) == (kernel, linear.name, m)
                }
                out.append(row)
                winners.append(best)
            # The class's suggestion: the winner with the least total time over its linears.
            totals = {}
            for config in {w for w in winners if w is not None}:
                times = [sweep.measure(linear, kernel, m, config) for linear in linears]
                if all(t is not None for t in times):
                    totals[config] = sum(times)
            if totals:
                suggested[kernel, m] = min(totals, key=totals.get)
    return out, suggested


def suggestion_text(suggested: dict[str, dict[tuple[str, int], Any]], rows: list[int]) -> str:
    """tiling.TABLE's literal for the measured rows (the prefill row kept from the current table)."""
    from compiler_core.backends.torch.cuda.tiling import TABLE

    lines = ["TABLE = {"]
    for kernel in ("int4", "fp8"):
        lines.append(f'    "{kernel}": {{')
        for size in ("small", "large"):
            entries = []
            for m in rows:
                config = suggested.get(size, {}).get((kernel, m))
                if config is not None:
                    entries.append(f"({m}, {config_literal(config)})")
            prefill = TABLE[kernel][size][-1]
            entries.append(f"(ANY_M, {config_literal(prefill[1])})")
            lines.append(f'        "{size}": (' + ", ".join(entries) + ",),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="interpreter-sized shapes and a reduced search")
    parser.add_argument("--rows", default=None, help="comma-separated M (default 1,2,4,8,16,32,64; tiny: 1,3)")
    parser.add_argument("--kernels", default="int4,fp8")
    parser.add_argument("--budget_s", type=float, default=170.0, help="seconds for the searches (prefill timing aside)")
    parser.add_argument("--prefill_rows", default="128,512,1024", help="M of the INT4 prefill comparison; '' for none")
    parser.add_argument("--json", type=Path, default=Path("gpu_tune.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    timing = device.type == "cuda"
    if not timing:
        use_triton_interpreter()
    rows = [int(r) for r in (args.rows or ("1,3" if args.tiny else "1,2,4,8,16,32,64")).split(",")]
    kernels = args.kernels.split(",")
    shapes, group = (TINY, TINY_GROUP) if args.tiny else (FALCON_7B, GROUP)
    search = TINY_SEARCH if args.tiny else SEARCH
    from compiler_core.backends.torch.cuda.tiling import Config, size_class

    classes: dict[str, list[str]] = {}
    for name, (out, inp) in shapes.items():
        classes.setdefault("small" if args.tiny else size_class(out, inp), []).append(name)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if timing else "cpu (interpreter, untimed)",
        "versions": {"torch": torch.__version__},
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
        "prefill": [],
    }
    import triton

    result["versions"]["triton"] = triton.__version__
    start = time.perf_counter()
    clock = {"start": start, "end": start + args.budget_s, "left": len(shapes) * len(rows) * len(kernels)}
    sweep = Sweep(timing)
    suggested: dict[str, dict[tuple[str, int], Any]] = {}
    print(f"# {result['device']}; {result['versions']}; {clock['left']} searches in {args.budget_s:.0f} s", flush=True)
    for size, names in classes.items():
        linears = [Linear(name, *shapes[name], group, device, 1 if args.tiny else 64) for name in names]
        found, suggested[size] = sweep_class(sweep, linears, kernels, rows, search, timing, clock)
        result["rows"] += found
        if args.prefill_rows and "int4" in kernels:
            prefill = tuple(int(r) for r in args.prefill_rows.split(","))
            result["prefill"] += prefill_rows(linears, (3, 5) if args.tiny else prefill, timing)
        result["suggested"] = {s: {f"{k} {m}": asdict(c) for (k, m), c in v.items()} for s, v in suggested.items()}
        args.json.write_text(json.dumps(result, indent=1))  # what is measured so far survives a timeout
        del linears
        if timing:
            torch.cuda.empty_cache()
    result["skipped_configs"] = sweep.skipped
    result["seconds"] = time.perf_counter() - start
    result["suggested_table"] = suggestion_text(suggested, rows)
    args.json.write_text(json.dumps(result, indent=1))
    print("| kernel | linear | M | best config | best us | table us | bf16 us | _scaled_mm us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:

        def cell(v: Any) -> str:
            return f"{v:.1f}" if isinstance(v, float) else str(v if v is not None else "-")

        best = config_literal(Config(**r["best"])) if r["best"] else "none passed"
        mm = r.get("fp8 quant + _scaled_mm", "-")
        print(
            f"| {r['kernel']} | {r['linear']} | {r['m']} | {best} | {cell(r['best_us'])} | {cell(r['table_us'])} "
            f"| {cell(r['bf16 F.linear'])} | {cell(mm)} |"
        )
    print(f"# {sweep.skipped} configurations failed their check or did not compile; {result['seconds']:.0f} s")
    print("# suggested compiler_core/backends/torch/cuda/tiling.py table:")
    print(result["suggested_table"], flush=True)


if __name__ == "__main__":
    main()
