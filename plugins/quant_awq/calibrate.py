"""AWQ calibration: what each linear's input looks like, where its scale goes, and the per-layer
quantization that the scheme's ``quantize_layer`` performs.

Design (one consistent rule for every architecture):

* The architecture's ``scale_groups`` method names, for each shared activation, the node that
  produces it and the linears that read it; for an architecture that names none, the core
  derives them from the graph (:mod:`compiler_core.quantize.scale_groups`).
* When the producer is a norm (``layer_norm``/``rms_norm``) whose output only those linears read,
  the AWQ scale ``s`` is **folded**: the norm's weight and bias are divided by ``s`` and every
  reader's weight multiplied by ``s`` (excluded readers too, in full precision), so the
  quantized graph has no extra op. One scale is searched jointly for the group's quantized
  linears, as llm-awq does for Falcon's shared ``input_layernorm``.
* Any other producer (an activation such as GELU, which no weight can absorb) keeps the scale as
  a ``prequant_scaling_factor = 1 / s`` multiply on the linear's input, as TensorRT-LLM does.
  Each such linear gets its own search, since nothing forces its readers to share one scale.
* Linears outside every scale group (Falcon's attention output) get no AWQ scale, only the
  clip search, as in llm-awq.
* Clipping is searched for every quantized linear except those that feed an ``attention`` node
  (a fused QKV projection): llm-awq skips q/k because errors in queries and keys are amplified
  by the softmax in a way the per-group output MSE does not see.

Activations are observed once, on the full-precision model: per input channel ``mean|x|`` over
every calibration token, plus an evenly spaced sample of at most ``max_tokens`` real tokens that
the loss of each search is measured on (memory: ``max_tokens`` x the linears' input widths, in
the model dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from compiler_core.api import ScaleGroup
from compiler_core.errors import ModelcError
from compiler_core.ir import Graph, Node
from compiler_core.quantize.calibration import CalibrationSet, collect_stats, real_tokens
from compiler_core.registry import Registry
from modelc_plugins.quant_awq.int4 import pack_int4, quantize_groups
from modelc_plugins.quant_awq.search import search_clip, search_scale
from modelc_plugins.quant_awq.transform import quantized_node

NORM_OPS = ("layer_norm", "rms_norm")
#: Tokens each search is scored on: enough to rank 20 candidate scales; cost grows linearly with it.
DEFAULT_MAX_TOKENS = 2048


@dataclass
class ActivationStats:
    """What calibration keeps about one activation (the input of one or more linears)."""

    abs_sum: torch.Tensor | None = None
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def sample(self) -> torch.Tensor:
        """The sampled tokens ``[tokens, channels]`` in the model dtype, on the CPU (joined once)."""
        if len(self.samples) > 1:
            self.samples = [torch.cat(self.samples)]
        return self.samples[0]


@dataclass(frozen=True)
class ScalePlan:
    """Where one searched scale goes: folded into ``producer`` or kept as each linear's prequant."""

    producer: Node
    linears: tuple[Node, ...]
    fold: bool


def plan_scales(graph: Graph, groups: list[ScaleGroup], quantized: set[str]) -> list[ScalePlan]:
    """Check the hook's groups against the graph and decide fold or prequant for each."""
    nodes = {n.name: n for n in graph.nodes}
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for value in node.inputs:
            readers.setdefault(value, []).append(node)
    plans, claimed = [], set()
    for group in groups:
        producer = nodes.get(group.producer)
        if producer is None:
            raise ModelcError(f"scale_groups: producer {group.producer!r} is not a node of {graph.name}")
        linears = []
        for name in group.linears:
            node = nodes.get(name)
            if node is None or node.op != "linear" or node.inputs[0] not in producer.outputs:
                raise ModelcError(f"scale_groups: {name!r} is not a linear reading the output of {producer.name}")
            if name in claimed:
                raise ModelcError(f"scale_groups: linear {name!r} is in more than one group")
            claimed.add(name)
            linears.append(node)
        if not any(n.name in quantized for n in linears):
            continue
        # Folding changes the norm's output for every reader: only the group may read it.
        value = linears[0].inputs[0]
        group_readers = {r.name for r in readers.get(value, [])}
        only_group = group_readers == {n.name for n in linears} and value not in graph.outputs
        fold = producer.op in NORM_OPS and only_group
        if fold:
            plans.append(ScalePlan(producer, tuple(linears), True))
        else:
            plans.extend(ScalePlan(producer, (n,), False) for n in linears if n.name in quantized)
    return plans


def observe_inputs(
    registry: Registry,
    graph: Graph,
    weights: dict[str, torch.Tensor],
    calibration: CalibrationSet,
    linears: list[Node],
    *,
    max_tokens: int,
    device: str,
    show_progress: bool,
) -> dict[str, ActivationStats]:
    """Run the calibration set once; return stats per activation value read by ``linears``."""
    stride = max(1, -(-calibration.num_tokens // max_tokens))
    stats: dict[str, ActivationStats] = {}
    watch: list[str] = []  # one linear per activation: its readers all see the same tensor
    for node in linears:
        if node.inputs[0] not in stats:
            stats[node.inputs[0]] = ActivationStats()
            watch.append(node.name)
    seen = {value: 0 for value in stats}

    def record(node: Node, inputs: tuple[torch.Tensor, ...], output: Any, ctx) -> None:
        value = node.inputs[0]
        x = real_tokens(inputs[0], ctx)
        x = x.reshape(-1, x.shape[-1])
        st = stats[value]
        part = x.float().abs().sum(0)
        st.abs_sum = part if st.abs_sum is None else st.abs_sum + part
        st.count += x.shape[0]
        # Evenly spaced tokens over the whole set: keep global token indices divisible by the stride.
        first = (-seen[value]) % stride
        seen[value] += x.shape[0]
        st.samples.append(x[first::stride].to("cpu", copy=True))

    collect_stats(
        registry,
        graph,
        weights,
        calibration,
        {name: record for name in watch},
        device=device,
        show_progress=show_progress,
        desc="calibrate (int4_awq)",
    )
    return stats


def fold_into_norm(weights: dict[str, torch.Tensor], producer: Node, scales: torch.Tensor) -> None:
    """Divide the norm's weight (and bias) by ``scales`` in place of the dict entries."""
    for role in ("weight", "bias"):
        name = producer.params.get(role)
        if name is not None:
            t = weights[name]
            weights[name] = (t.float() / scales.to(t.device)).to(t.dtype)


def feeds_attention(graph: Graph, node: Node) -> bool:
    """True for a linear whose output an ``attention`` node reads (a fused QKV projection)."""
    return any(n.op == "attention" and node.outputs[0] in n.inputs for n in graph.nodes)


def quantize_linear(
    node: Node, graph: Graph, weights: dict[str, torch.Tensor], stats: dict[str, Any]
) -> tuple[list[Node], dict[str, torch.Tensor]]:
    """One linear -> ``awq_linear`` plus its tensors (what :meth:`Int4AwqScheme.quantize_layer` returns).

    ``stats``: ``group_size``; ``scales``, the AWQ scale of the weight's input channels (or
    None); ``prequant``, keep ``1 / scales`` as the input multiply (else the producer absorbed
    it); ``x``, a sample of the linear's full-precision input (moved to ``device`` for the
    search); ``clip``, run the clip search.
    """
    group_size = int(stats["group_size"])
    weight = weights[node.params["weight"]]
    x = stats["x"].to(stats.get("device", "cpu"), torch.float32)
    w = weight.to(x.device, torch.float32)
    scales = stats.get("scales")
    if scales is not None:
        scales = scales.to(x.device)
        w, x = w * scales, x / scales
    amax = search_clip(x, w, group_size) if stats.get("clip") else None
    q, wscale = quantize_groups(w, group_size, amax, scale_dtype=weight.dtype)
    prequant = bool(stats.get("prequant"))
    new_node, _ = quantized_node(node, graph.params, group_size, prequant, graph.attrs["dtype"])
    tensors = {node.params["weight"]: pack_int4(q).cpu(), new_node.params["weights_scaling_factor"]: wscale.cpu()}
    if prequant:
        tensors[new_node.params["prequant_scaling_factor"]] = (1.0 / scales).to("cpu", weight.dtype)
    return [new_node], tensors


def search_scales(
    plans: list[ScalePlan],
    weights: dict[str, torch.Tensor],
    stats: dict[str, ActivationStats],
    quantized: set[str],
    group_size: int,
    *,
    device: str,
    progress_bar: Callable[[list[ScalePlan]], Iterable[ScalePlan]],
) -> dict[str, torch.Tensor]:
    """Search each plan's scale and apply the fold to ``weights``; return the scale of every scaled linear."""
    out: dict[str, torch.Tensor] = {}
    for plan in progress_bar(plans):
        act = stats[plan.linears[0].inputs[0]]
        members = [n for n in plan.linears if n.name in quantized]
        x = act.sample().to(device, torch.float32)
        found = search_scale(
            x,
            [weights[n.params["weight"]].to(device) for n in members],
            group_size,
            x_mean_abs=act.mean_abs.to(device),
        )
        scales = found.scales.cpu()
        if plan.fold:
            fold_into_norm(weights, plan.producer, scales)
            for n in plan.linears:
                if n.name not in quantized:
                    w = weights[n.params["weight"]]
                    weights[n.params["weight"]] = (w.float() * scales.to(w.device)).to(w.dtype)
        for n in members:
            out[n.name] = scales
    return out
