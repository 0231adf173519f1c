"""Running a rank's TensorRT engines: ``execute_async_v3`` on torch CUDA tensors, KV cache between steps.

The plan (segments and collectives) is the ONNX plan the engines were built from, so the step
order, the cache bookkeeping and the collectives are :class:`modelc_plugins.onnx.session.PlanSession`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from compiler_core.errors import ModelcError, UsageError
from compiler_core.ir import Graph
from modelc_plugins.onnx.export import RankPlan, Step
from modelc_plugins.onnx.session import PlanSession
from modelc_plugins.tensorrt.builder import DECODE_PROFILE, PROMPT_PROFILE
from modelc_plugins.tensorrt.package import INSTALL_HINT, gpu_reason, import_tensorrt, make_logger


def torch_dtypes(trt) -> dict[Any, torch.dtype]:
    """TensorRT DataType -> torch dtype for the types engine I/O can have."""
    return {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.FP8: torch.float8_e4m3fn,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }


class TensorRTSession(PlanSession):
    """A rank of a tensorrt engine on one CUDA GPU."""

    def __init__(self, engine_dir: Path, graph: Graph, plan: RankPlan, settings: Mapping[str, Any], device: str):
        trt = import_tensorrt()
        if trt is None:
            raise UsageError(INSTALL_HINT)
        if not str(device).startswith("cuda"):
            raise UsageError(
                f"{engine_dir}: tensorrt engines run on a CUDA GPU, not on {device!r} "
                "(build with --backend torch or onnx to run on the CPU)"
            )
        reason = gpu_reason(trt)
        if reason is not None:
            raise ModelcError(f"{engine_dir}: cannot run TensorRT engines here: {reason}")
        super().__init__(graph, plan, torch.device(device))
        self.settings = dict(settings)
        self.dtypes = torch_dtypes(trt)
        self.input_mode = trt.TensorIOMode.INPUT
        self.logger = make_logger(trt)
        self.engines, self.contexts = {}, {}
        self.profile: dict[str, int | None] = {}
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self.logger)
            for file in plan.files:
                path = Path(engine_dir) / file
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    detail = self.logger.errors[-1] if self.logger.errors else "no error message"
                    raise ModelcError(
                        f"{path}: TensorRT could not load the engine ({detail}); it must be run by the "
                        "TensorRT package that built it"
                    )
                self.engines[file] = engine
                self.contexts[file] = engine.create_execution_context()
                self.profile[file] = None
        # TensorRT wants a valid address even for a tensor with no elements (an empty past cache).
        self._placeholder = torch.empty(64, dtype=torch.uint8, device=self.device)
        self._step_profile = PROMPT_PROFILE

    def allocate(self, batch: int, max_len: int) -> None:
        limit_rows, limit_len = int(self.settings["max_batch_size"]), int(self.settings["max_seq_len"])
        if batch > limit_rows:
            raise UsageError(
                f"this run needs {batch} rows (prompts x beams) but the engine was built with "
                f"--max_batch_size {limit_rows}"
            )
        if max_len > limit_len:
            raise UsageError(f"this run needs {max_len} tokens but the engine was built with --max_seq_len {limit_len}")
        super().allocate(batch, max_len)

    def forward(self, x, positions, attention_mask, start):
        # The prompt profile has no past; the decode profile takes one token after any past.
        if start == 0:
            self._step_profile = PROMPT_PROFILE
        elif x.shape[1] == 1:
            self._step_profile = DECODE_PROFILE
        else:
            raise ModelcError(
                f"a {x.shape[1]}-token step after {start} cached tokens is outside the engine's profiles "
                "(prompt without past, or one token after a past)"
            )
        with torch.cuda.device(self.device):
            return super().forward(x, positions, attention_mask, start)

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._placeholder.data_ptr()

    def run_step(self, step: Step, feeds):
        engine, context = self.engines[step.file], self.contexts[step.file]
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if self.profile[step.file] != self._step_profile:
            context.set_optimization_profile_async(self._step_profile, stream)
            self.profile[step.file] = self._step_profile
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        held = []  # inputs converted here must outlive the asynchronous execution
        for name in names:
            if engine.get_tensor_mode(name) != self.input_mode:
                continue
            t = feeds[name].to(self.device, self.dtypes[engine.get_tensor_dtype(name)]).contiguous()
            held.append(t)
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ModelcError(
                    f"{step.file}: input {name} of shape {tuple(t.shape)} is outside the engine's profile"
                )
            context.set_tensor_address(name, self._address(t))
        outputs = {}
        for name in names:
            if engine.get_tensor_mode(name) == self.input_mode:
                continue
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[engine.get_tensor_dtype(name)], device=self.device)
            context.set_tensor_address(name, self._address(out))
            outputs[name] = out
        if not context.execute_async_v3(stream):
            detail = self.logger.errors[-1] if self.logger.errors else "no error message"
            raise ModelcError(f"{step.file}: TensorRT execution failed: {detail}")
        return outputs
