"""``modelc inspect`` for onnx engines: each segment's opset, op histogram, inputs and outputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from modelc_plugins.onnx.export import RankPlan
from modelc_plugins.onnx.lowering import DTYPE_NAMES


def _value(info: onnx.ValueInfoProto) -> str:
    tt = info.type.tensor_type
    dims = ",".join(str(d.dim_value) if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
    return f"{info.name}:{DTYPE_NAMES.get(tt.elem_type, tt.elem_type)}[{dims}]"


def _names(values: list[str], limit: int = 6) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def describe_plan(engine_dir: Path, plan: RankPlan) -> str:
    """Text summary of one rank's ONNX files (reads the graphs, not the external weights)."""
    data = f"{plan.data_file} ({plan.data_bytes / 2**20:.2f} MiB)" if plan.data_file else "none"
    lines = [f"  onnx: opset {plan.opset}, {len(plan.files)} segment(s), external data {data}"]
    for step in plan.steps:
        if step.file is None:
            extra = f" axis={step.axis}" if step.axis is not None else ""
            lines.append(f"    {step.kind}({step.inputs[0]}) -> {step.outputs[0]}{extra}")
            continue
        model = onnx.load(str(engine_dir / step.file), load_external_data=False)
        opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
        ops = Counter(n.op_type for n in model.graph.node)
        external = sum(1 for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        lines += [
            f"    {step.file}: {len(model.graph.node)} nodes, opset {opsets}, "
            f"{len(model.graph.initializer)} initializers ({external} external)",
            "      ops: " + ", ".join(f"{op}×{n}" for op, n in sorted(ops.items())),
            "      inputs: " + _names([_value(v) for v in model.graph.input]),
            "      outputs: " + _names([_value(v) for v in model.graph.output]),
        ]
    return "\n".join(lines)
