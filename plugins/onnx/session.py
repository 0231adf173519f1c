"""Running a rank's plan: ONNX segments (or TensorRT engines built from them) and collectives between.

:class:`PlanSession` holds what every plan-driven backend shares: the KV cache as tensors kept
between steps (``present_*`` of one step become ``past_*`` of the next, truncated to ``start``),
beam reordering, and the collectives run with the session's ``comm`` (set by the runner, as for
``TorchSession``). :class:`OnnxSession` runs the segments with onnxruntime.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from compiler_core.dtypes import torch_dtype
from compiler_core.errors import ModelcError, UsageError
from compiler_core.ir import Graph
from compiler_core.runtime.context import Communicator
from compiler_core.runtime.session import RankSession
from modelc_plugins.onnx.export import RankPlan, Step
from modelc_plugins.onnx.lowering import (
    ATTENTION_MASK,
    BATCH,
    PAST,
    POSITION_IDS,
    SEQ,
    TOTAL,
    ValueType,
    onnx_type,
    past_name,
    present_name,
)


class PlanSession(RankSession):
    """A rank run step by step from its :class:`RankPlan`; subclasses run the model steps."""

    def __init__(self, graph: Graph, plan: RankPlan, device: torch.device, comm: Communicator | None = None):
        self.graph = graph
        self.plan = plan
        self.device = device
        self.comm = comm
        self.cache: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}

    @abstractmethod
    def run_step(self, step: Step, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one model step on ``feeds`` (by input name); return its outputs by name."""

    def allocate(self, batch: int, max_len: int) -> None:
        self.cache = self._empty_cache(batch)

    def _empty_cache(self, batch: int) -> dict[str, torch.Tensor]:
        cache = {}
        for slot, spec in self.plan.cache.items():
            shape = (batch, spec.num_kv_heads, 0, spec.head_dim)
            for kind in ("key", "value"):
                cache[past_name(kind, slot)] = torch.empty(shape, dtype=torch_dtype(spec.dtype), device=self.device)
        return cache

    def forward(self, x, positions, attention_mask, start):
        if start == 0 or not self.cache:
            self.cache = self._empty_cache(x.shape[0])
        seq = positions.shape[1]
        self.dims = {BATCH: x.shape[0], SEQ: seq, PAST: start, TOTAL: start + seq}
        values: dict[str, torch.Tensor] = {
            self.plan.input: x.to(self.device),
            POSITION_IDS: positions.to(self.device, torch.int64),
            ATTENTION_MASK: attention_mask.to(self.device, torch.int64),
        }
        for name, past in self.cache.items():
            if past.shape[2] < start:
                raise ModelcError(f"KV cache holds {past.shape[2]} tokens but the step starts at position {start}")
            values[name] = past[:, :, :start]
        for step in self.plan.steps:
            if step.kind == "onnx":
                values.update(self.run_step(step, {name: values[name] for name in step.inputs}))
            else:
                values[step.outputs[0]] = self._collective(step, values[step.inputs[0]])
        for slot in self.plan.cache:
            for kind in ("key", "value"):
                self.cache[past_name(kind, slot)] = values[present_name(kind, slot)]
        return values[self.plan.output]

    def concrete_shape(self, vtype: ValueType) -> tuple[int, ...] | None:
        """The shape of a value in this step (symbolic dims resolved), or None when a dim is unknown."""
        shape = []
        for dim in vtype.dims:
            if isinstance(dim, str) and dim not in self.dims:
                return None
            shape.append(dim if isinstance(dim, int) else self.dims[dim])
        return tuple(shape)

    def _collective(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return x
        if step.kind == "all_reduce":
            return self.comm.all_reduce(x)
        return self.comm.all_gather(x, int(step.axis))

    def reorder_cache(self, index):
        self.cache = {name: t.index_select(0, index.to(t.device)) for name, t in self.cache.items()}


# Types numpy cannot hold arrive from onnxruntime as raw bits of the same width.
_BIT_VIEWS = {"bfloat16": np.int16, "float8_e4m3fn": np.uint8}


def from_ortvalue(value, dtype: str) -> torch.Tensor:
    """The torch tensor of a CPU-readable OrtValue of IR dtype ``dtype``."""
    array = value.numpy()
    if dtype in _BIT_VIEWS:
        return torch.from_numpy(array.view(_BIT_VIEWS[dtype])).view(torch_dtype(dtype))
    return torch.from_numpy(array)


class OnnxSession(PlanSession):
    """A rank of an onnx engine run by onnxruntime: the CPU provider, or the CUDA provider on ``device="cuda"``.

    Inputs and outputs are torch tensors on the session's device, bound in place with IOBinding
    (outputs preallocated from the plan's shapes), so no step copies the KV cache.
    """

    def __init__(self, engine_dir: Path, graph: Graph, plan: RankPlan, device: str = "cpu"):
        import onnxruntime as ort

        super().__init__(graph, plan, torch.device(device))
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UsageError(
                    f"--device {device}: onnxruntime here has no CUDAExecutionProvider "
                    "(pip install onnxruntime-gpu, or run with --device cpu)"
                )
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
        # onnxruntime fuses blocked-int4 DequantizeLinear -> MatMul into MatMulNBits, which by
        # default (accuracy level 4) also quantizes the activations to int8: level 1 keeps the
        # float activations the graph specifies (weight-only INT4, as the reference computes).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.sessions = {}
        for file in plan.files:
            path = Path(engine_dir) / file
            try:
                self.sessions[file] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types per failure
                hint = ""
                if graph.attrs.get("dtype") == "bfloat16" and self.device.type == "cpu":
                    hint = " (onnxruntime's CPU provider has no bfloat16 MatMul/Softmax: use float16/float32 or CUDA)"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelcError(f"{path}: onnxruntime cannot load it: {first}{hint}") from None
        self._where = ("cuda" if self.device.type == "cuda" else "cpu", self.device.index or 0)
        # onnxruntime wants a valid address even for a tensor with no elements (an empty past).
        self._placeholder = torch.empty(64, dtype=torch.uint8, device=self.device)

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._placeholder.data_ptr()

    def run_step(self, step, feeds):
        binding = self.sessions[step.file].io_binding()
        held = []  # bound memory must outlive the run
        for name, t in feeds.items():
            t = t.to(self.device).contiguous()
            held.append(t)
            dtype = onnx_type(step.types[name].dtype)
            binding.bind_input(name, *self._where, dtype, tuple(t.shape), self._address(t))
        outputs: dict[str, torch.Tensor] = {}
        for name in step.outputs:
            vtype = step.types[name]
            shape = self.concrete_shape(vtype)
            if shape is None:  # a dim only known after the run: let onnxruntime allocate it
                binding.bind_output(name, *self._where)
                continue
            out = torch.empty(shape, dtype=torch_dtype(vtype.dtype), device=self.device)
            binding.bind_output(name, *self._where, onnx_type(vtype.dtype), shape, self._address(out))
            outputs[name] = out
        self.sessions[step.file].run_with_iobinding(binding)
        if len(outputs) < len(step.outputs):
            for name, value in zip(step.outputs, binding.get_outputs(), strict=True):
                if name not in outputs:
                    outputs[name] = from_ortvalue(value, step.types[name].dtype).to(self.device)
        return outputs
