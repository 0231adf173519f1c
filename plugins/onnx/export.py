"""One rank's IR graph -> ONNX segment files + one external weight file + the rank's run plan.

The graph is cut at its collectives (``all_reduce``/``all_gather``): everything between two cuts
becomes one ONNX model, and the plan says which segment runs next and which collective runs
between them. A rank without collectives is one model, ``rank{r}.onnx``; otherwise the models are
``rank{r}.seg{k}.onnx``. Weights of all of a rank's segments share ``rank{r}.onnx.data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper

from compiler_core.errors import ModelcError
from compiler_core.ir import Graph, Node
from compiler_core.lowering import LoweringTable, plan_lowering
from compiler_core.registry import Registry
from modelc_plugins.onnx.lowering import (
    ATTENTION_MASK,
    BATCH,
    DTYPE_NAMES,
    IR_VERSION,
    OPSET,
    POSITION_IDS,
    SEQ,
    CacheSpec,
    ExternalData,
    OnnxLowering,
    ValueType,
    onnx_type,
)
from modelc_plugins.onnx.ops import COLLECTIVES

PLAN_VERSION = 1


@dataclass
class Step:
    """Either an ONNX model to run (``file``) or a collective (``op``) between two models."""

    kind: str  # "onnx", "all_reduce" or "all_gather"
    inputs: list[str]
    outputs: list[str]
    file: str | None = None
    axis: int | None = None
    #: Types of an ONNX step's inputs and outputs, by name.
    types: dict[str, ValueType] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "inputs": self.inputs, "outputs": self.outputs}
        if self.file is not None:
            data["file"] = self.file
            data["types"] = {name: t.to_json() for name, t in self.types.items()}
        if self.axis is not None:
            data["axis"] = self.axis
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        return cls(
            kind=data["kind"],
            inputs=list(data["inputs"]),
            outputs=list(data["outputs"]),
            file=data.get("file"),
            axis=data.get("axis"),
            types={name: ValueType.from_json(t) for name, t in data.get("types", {}).items()},
        )


@dataclass
class RankPlan:
    """How to run one rank: its steps, KV-cache slots, main input and output, weight file."""

    steps: list[Step]
    cache: dict[str, CacheSpec]
    input: str
    output: str
    data_file: str
    data_bytes: int
    opset: int = OPSET

    @property
    def files(self) -> list[str]:
        return [s.file for s in self.steps if s.file is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "opset": self.opset,
            "input": self.input,
            "output": self.output,
            "data_file": self.data_file,
            "data_bytes": self.data_bytes,
            "cache": {slot: spec.to_json() for slot, spec in self.cache.items()},
            "steps": [s.to_json() for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "engine config.json") -> RankPlan:
        if data.get("plan_version") != PLAN_VERSION:
            raise ModelcError(f"{source}: ONNX plan version {data.get('plan_version')!r} is not {PLAN_VERSION}")
        return cls(
            steps=[Step.from_json(s) for s in data["steps"]],
            cache={slot: CacheSpec(**spec) for slot, spec in data["cache"].items()},
            input=data["input"],
            output=data["output"],
            data_file=data["data_file"],
            data_bytes=int(data["data_bytes"]),
            opset=int(data["opset"]),
        )


def split_at_collectives(graph: Graph) -> list[list[Node] | Node]:
    """The node list cut at collectives: runs of ordinary nodes and single collective nodes."""
    parts: list[list[Node] | Node] = []
    run: list[Node] = []
    for node in graph.nodes:
        if node.op in COLLECTIVES:
            if run:
                parts.append(run)
                run = []
            parts.append(node)
        else:
            run.append(node)
    if run:
        parts.append(run)
    return parts


def graph_input_types(graph: Graph) -> dict[str, ValueType]:
    """Types of the rank graph's own inputs: token ids on the first stage, hidden states later."""
    types = {}
    for name in graph.inputs:
        if name == "input_ids":
            types[name] = ValueType("int64", (BATCH, SEQ))
        elif "hidden_size" in graph.attrs:
            types[name] = ValueType(
                str(graph.attrs.get("dtype", "float32")), (BATCH, SEQ, int(graph.attrs["hidden_size"]))
            )
        else:
            raise ModelcError(f"graph {graph.name}: input {name!r} needs graph attribute 'hidden_size' for ONNX")
    return types


def export_rank(
    registry: Registry,
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    out_dir: Path,
    rank: int,
    lowerings: LoweringTable | None = None,
) -> RankPlan:
    """Write rank ``rank`` of ``graph`` as ONNX into ``out_dir``; return its plan.

    Nodes are lowered with ``lowerings`` (default ``registry.lowerings``) for ``backend="onnx"``.
    """
    out_dir = Path(out_dir)
    parts = split_at_collectives(graph)
    segments = sum(isinstance(p, list) for p in parts)
    known = graph_input_types(graph)
    later_uses = _later_uses(graph, parts)
    table = registry.lowerings if lowerings is None else lowerings
    tp_size = int(graph.attrs.get("mapping", {}).get("tp_size", 0)) or None
    steps: list[Step] = []
    cache: dict[str, CacheSpec] = {}
    data_path = out_dir / f"rank{rank}.onnx.data"
    with ExternalData(data_path) as data:
        index = 0
        for i, part in enumerate(parts):
            if isinstance(part, Node):
                steps.append(_collective_step(part, known, tp_size))
                continue
            name = f"rank{rank}.onnx" if segments == 1 else f"rank{rank}.seg{index}.onnx"
            ctx = OnnxLowering(graph, weights, data, name.removesuffix(".onnx"), dict(known))
            for step in plan_lowering(part, graph, "onnx", table, later_uses[i]):
                ctx.begin(step.root)
                lowered = step.lower(ctx)
                if len(lowered) != len(step.outputs):
                    raise ModelcError(f"node {step.root.name}: the onnx lowering returned {len(lowered)} outputs")
                ctx.bound.update(zip(step.outputs, lowered, strict=True))
            exported = [v for n in part for v in n.outputs if v in later_uses[i]]
            step = _write_segment(ctx, exported, out_dir / name)
            known.update({v: step.types[v] for v in exported})
            cache.update(ctx.cache)
            steps.append(step)
            index += 1
        data_bytes = data.nbytes
    if data_bytes == 0:
        data_path.unlink()
    return RankPlan(
        steps=steps,
        cache=cache,
        input=graph.inputs[0],
        output=graph.outputs[0],
        data_file=data_path.name if data_bytes else "",
        data_bytes=data_bytes,
    )


def _later_uses(graph: Graph, parts: list[list[Node] | Node]) -> list[set[str]]:
    """For each part, the values read by later parts or returned by the graph."""
    needed = set(graph.outputs)
    result: list[set[str]] = [set()] * len(parts)
    for i in range(len(parts) - 1, -1, -1):
        result[i] = set(needed)
        nodes = parts[i] if isinstance(parts[i], list) else [parts[i]]
        for node in nodes:
            needed.update(node.inputs)
    return result


def _collective_step(node: Node, known: dict[str, ValueType], tp_size: int | None) -> Step:
    (src,), (dst,) = node.inputs, node.outputs
    if src not in known:
        raise ModelcError(f"node {node.name}: input {src!r} has no known type")
    vtype = known[src]
    axis = None
    if node.op == "all_gather":
        axis = int(node.attrs["axis"])
        dims = list(vtype.dims)
        dim = dims[axis]
        # The gathered size is static when the graph's mapping gives the tp size.
        dims[axis] = dim * tp_size if isinstance(dim, int) and tp_size else f"{node.name}.gathered"
        vtype = ValueType(vtype.dtype, tuple(dims))
    known[dst] = vtype
    return Step(node.op, [src], [dst], axis=axis)


def _value_info(name: str, vtype: ValueType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_type(vtype.dtype), list(vtype.dims))


def _write_segment(ctx: OnnxLowering, exported: list[str], path: Path) -> Step:
    """Give the exported IR values their IR names, infer their types, write the model file."""
    for ir_name in exported:
        onnx_name = ctx.bound[ir_name]
        if onnx_name != ir_name:
            ctx.emit("Identity", [onnx_name], outputs=[ir_name])
    # Main input and other IR values first, then positions and mask, then the cache in slot order.
    order = {POSITION_IDS: 1, ATTENTION_MASK: 2}
    used = sorted(ctx.inputs_used, key=lambda n: order.get(n, 3 if n.startswith("past_") else 0))
    ctx.inputs_used = {n: ctx.inputs_used[n] for n in used}
    inputs = [_value_info(n, t) for n, t in ctx.inputs_used.items()]
    outputs = [helper.make_empty_tensor_value_info(n) for n in exported]
    outputs += [_value_info(n, t) for n, t in ctx.outputs_made.items()]
    graph = helper.make_graph(ctx.nodes, ctx.name, inputs, outputs, list(ctx.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelc")
    model.ir_version = IR_VERSION
    types = dict(ctx.inputs_used)
    types.update(ctx.outputs_made)
    types.update(_inferred_types(model, exported, path))
    for out in model.graph.output:
        if out.name in exported:
            out.CopyFrom(_value_info(out.name, types[out.name]))
    onnx.save_model(model, str(path))
    return Step("onnx", list(ctx.inputs_used), [*exported, *ctx.outputs_made], file=path.name, types=types)


def _inferred_types(model: onnx.ModelProto, names: list[str], path: Path) -> dict[str, ValueType]:
    if not names:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ModelcError(f"{path.name}: ONNX shape inference failed: {exc}") from None
    found = {}
    for info in [*inferred.graph.output, *inferred.graph.value_info]:
        if info.name in names and info.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            tt = info.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
            found[info.name] = ValueType(DTYPE_NAMES[tt.elem_type], dims)
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelcError(f"{path.name}: could not infer the type of segment output {missing[0]!r}")
    return found
