"""The onnx backend's lowering context: what a ``Lowering(op, "onnx", fn)`` or fused pattern receives.

One :class:`OnnxLowering` builds one segment of one rank's graph (a whole rank when the rank has no
collectives). A lowering reads its IR inputs with :meth:`OnnxLowering.inputs`, adds weights with
:meth:`OnnxLowering.param` / :meth:`OnnxLowering.initializer` (written once per rank as external
data), emits standard ONNX nodes with :meth:`OnnxLowering.emit` and returns the ONNX value names
of the node's outputs. Values every attention layer shares (position ids, the attention mask,
sequence lengths, rotary tables, the causal mask) are built once per segment and memoised.

The helpers at the bottom (:func:`emit_dequantize`, :func:`emit_quantize`, :func:`emit_matmul`)
express quantization as QuantizeLinear / DequantizeLinear the way TensorRT's ONNX parser accepts
them (symmetric, scales as initializers); the quantization primitives' lowerings
(:mod:`modelc_plugins.onnx.quant`) and the FP8 KV cache use them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from compiler_core.ir import Graph, Node

#: ONNX opset of every graph this backend writes: 21 brings blocked (INT4) DequantizeLinear and
#: QuantizeLinear's ``output_dtype``; 22 makes Cos/Sin and friends accept bfloat16.
OPSET = 22
#: ONNX IR version matching opset 22 (ONNX 1.17+); onnxruntime >= 1.20 and TensorRT read it.
IR_VERSION = 10

#: IR dtype name -> ONNX element type. "int4"/"uint4" exist only in ONNX (two values a byte).
ONNX_TYPES: dict[str, int] = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "float8_e4m3fn": TensorProto.FLOAT8E4M3FN,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}
DTYPE_NAMES: dict[int, str] = {v: k for k, v in ONNX_TYPES.items()}

#: Tensors at least this large go to the external data file; smaller ones stay inline.
EXTERNAL_THRESHOLD = 1024
#: Large tensors start on 64 KiB boundaries so runtimes can memory-map them (as onnx.save does).
ALIGN_LARGE, ALIGN_LARGE_THRESHOLD, ALIGN_SMALL = 65536, 1 << 20, 64

# Symbolic dimension names shared by every graph input/output (and by the TensorRT profiles).
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past_seq", "total_seq"
POSITION_IDS, ATTENTION_MASK = "position_ids", "attention_mask"


def onnx_type(dtype: str) -> int:
    """ONNX element type of an IR dtype name."""
    try:
        return ONNX_TYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no ONNX element type (known: {', '.join(ONNX_TYPES)})") from None


def past_name(kind: str, slot: str) -> str:
    """Graph input holding a cache slot's past keys or values (``kind`` is "key" or "value")."""
    return f"past_{kind}.{slot}"


def present_name(kind: str, slot: str) -> str:
    """Graph output holding a cache slot's keys or values after this step (past + new)."""
    return f"present_{kind}.{slot}"


def tensor_bytes(tensor: torch.Tensor | np.ndarray, dtype: str) -> bytes:
    """Raw little-endian bytes of ``tensor`` as ONNX stores element type ``dtype``.

    For "int4"/"uint4" the tensor holds one value per element (int8/uint8, in range) and is
    packed two to a byte, the first element in the low nibble, as ONNX specifies.
    """
    if isinstance(tensor, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(tensor))
    tensor = tensor.detach().cpu().contiguous()
    if dtype in ("int4", "uint4"):
        lo, hi = (-8, 7) if dtype == "int4" else (0, 15)
        values = tensor.reshape(-1).to(torch.int16)
        if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
            raise ValueError(f"{dtype} initializer: values must lie in [{lo}, {hi}]")
        nibbles = (values & 0xF).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        return (nibbles[0::2] | (nibbles[1::2] << 4)).numpy().tobytes()
    from compiler_core.dtypes import torch_dtype

    want = torch.bool if dtype == "bool" else torch_dtype(dtype)
    if tensor.dtype != want:
        tensor = tensor.to(want)
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


class ExternalData:
    """One rank's external weight file, shared by all of the rank's segments.

    Each tensor is written once (by name) the first time a segment asks for it; later requests,
    from the same or another segment, get a TensorProto pointing at the same bytes. Nothing is
    kept in memory after it is written, so a rank's weights may exceed protobuf's 2 GB limit.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # closed by close() / the with block
        self._offset = 0
        self._written: dict[str, tuple[int, int, tuple[int, ...], int]] = {}

    def tensor(self, name: str, data: bytes, dims: Sequence[int], elem_type: int) -> TensorProto:
        """A TensorProto named ``name`` whose data lives in this file (written on first request)."""
        entry = self._written.get(name)
        if entry is None:
            align = ALIGN_LARGE if len(data) >= ALIGN_LARGE_THRESHOLD else ALIGN_SMALL
            pad = -self._offset % align
            self._file.write(b"\0" * pad)
            self._offset += pad
            self._file.write(data)
            entry = (self._offset, len(data), tuple(int(d) for d in dims), elem_type)
            self._written[name] = entry
            self._offset += len(data)
        elif entry[2:] != (tuple(int(d) for d in dims), elem_type):
            raise ValueError(f"initializer {name!r} written twice with different shapes or types")
        offset, length, dims_, elem = entry
        proto = TensorProto(name=name, data_type=elem, dims=dims_)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            proto.external_data.add(key=key, value=value)
        return proto

    @property
    def nbytes(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ValueType:
    """Element type and dims (ints or symbolic names) of a graph input or output."""

    dtype: str
    dims: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValueType:
        return cls(data["dtype"], tuple(data["dims"]))


@dataclass
class CacheSpec:
    """The storage of one KV-cache slot: [batch, num_kv_heads, length, head_dim] of ``dtype``."""

    num_kv_heads: int
    head_dim: int
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "dtype": self.dtype}


@dataclass
class OnnxLowering:
    """Lowering context for one ONNX segment of one rank (see the module docstring).

    ``known`` holds the types of IR values defined before this segment (graph inputs and earlier
    segments' outputs); reading one through :meth:`value` makes it an input of this segment.
    """

    graph: Graph
    weights: Mapping[str, torch.Tensor]
    data: ExternalData
    name: str
    known: Mapping[str, ValueType]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    inputs_used: dict[str, ValueType] = field(default_factory=dict)
    outputs_made: dict[str, ValueType] = field(default_factory=dict)
    cache: dict[str, CacheSpec] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    #: IR value name -> ONNX value name, for values produced in this segment.
    bound: dict[str, str] = field(default_factory=dict)
    _dtypes: dict[str, str] = field(default_factory=dict)
    _consts: dict[tuple, str] = field(default_factory=dict)
    _scope: str = ""
    _counter: int = 0

    # --- types ------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> str:
        """The IR dtype of activations between nodes ("float32", "float16" or "bfloat16")."""
        return str(self.graph.attrs.get("dtype", "float32"))

    @property
    def compute_type(self) -> int:
        """ONNX element type of :attr:`compute_dtype`."""
        return onnx_type(self.compute_dtype)

    def dtype_of(self, value: str) -> str | None:
        """IR dtype name of an initializer, constant, input or helper output, when this context knows it."""
        return self._dtypes.get(value)

    # --- naming -----------------------------------------------------------------------------

    def begin(self, node: Node) -> None:
        """Name what follows after ``node`` (the exporter calls this before each lowering)."""
        self._scope = node.name

    def fresh(self, hint: str) -> str:
        """A new, unique ONNX value name in the current node's scope."""
        self._counter += 1
        return f"{self._scope or self.name}/{hint}_{self._counter}"

    # --- values -----------------------------------------------------------------------------

    def value(self, ir_name: str) -> str:
        """The ONNX name of IR value ``ir_name``; a value from outside becomes a segment input."""
        if ir_name in self.bound:
            return self.bound[ir_name]
        if ir_name not in self.known:
            raise KeyError(f"{self.name}: IR value {ir_name!r} is not defined before this node")
        if ir_name not in self.inputs_used:
            self.inputs_used[ir_name] = self.known[ir_name]
            self._dtypes[ir_name] = self.known[ir_name].dtype
        return ir_name

    def inputs(self, node: Node) -> list[str]:
        """ONNX names of ``node``'s IR inputs, in order."""
        return [self.value(v) for v in node.inputs]

    def outputs_of(self, node: Node) -> list[str]:
        """The IR output names: pass them as ``emit(..., outputs=...)`` for a node's last ONNX op."""
        return list(node.outputs)

    def graph_input(self, name: str, vtype: ValueType) -> str:
        """Declare (once) a graph input that is not an IR value, such as a past KV tensor."""
        if name not in self.inputs_used:
            self.inputs_used[name] = vtype
            self._dtypes[name] = vtype.dtype
        return name

    @property
    def positions(self) -> str:
        """Position ids of the new tokens, int64 [batch, seq] (a graph input)."""
        return self.graph_input(POSITION_IDS, ValueType("int64", (BATCH, SEQ)))

    @property
    def attention_mask(self) -> str:
        """1 for real tokens, 0 for padding, int64 [batch, total_seq] covering past + new tokens."""
        return self.graph_input(ATTENTION_MASK, ValueType("int64", (BATCH, TOTAL)))

    def shared(self, key: Any, build) -> Any:
        """Memoise a value built once per segment (``build()`` runs on the first request)."""
        if key not in self.memo:
            scope = self._scope
            self._scope = f"{self.name}/shared"
            try:
                self.memo[key] = build()
            finally:
                self._scope = scope
        return self.memo[key]

    @property
    def seq_length(self) -> str:
        """Number of new tokens, int64 [1]."""
        return self.shared("seq_length", lambda: self.emit("Shape", [self.positions], {"start": 1, "end": 2}))

    @property
    def total_length(self) -> str:
        """Past + new tokens, int64 [1]."""
        return self.shared("total_length", lambda: self.emit("Shape", [self.attention_mask], {"start": 1, "end": 2}))

    @property
    def past_length(self) -> str:
        """Tokens already in the cache (the new tokens' offset), int64 [1]."""
        return self.shared("past_length", lambda: self.emit("Sub", [self.total_length, self.seq_length]))

    def kv_cache(self, slot: str, key: str, value: str, spec: CacheSpec, scale: str | None = None) -> tuple[str, str]:
        """Append this step's ``key``/``value`` [batch, kv_heads, seq, head_dim] to cache slot ``slot``.

        Declares inputs ``past_key.<slot>``/``past_value.<slot>`` and outputs ``present_*``
        of ``spec.dtype``, and returns the full keys and values (past + new) in the compute
        dtype. With ``scale`` (an f32 scalar initializer) the cache stores a quantized type:
        new entries are QuantizeLinear'd (saturating) and the whole cache is read through
        DequantizeLinear, as the reference executor's scaled cache slots do.
        """
        if slot in self.cache:
            raise ValueError(f"{self.name}: KV-cache slot {slot!r} is used by two nodes")
        self.cache[slot] = spec
        dims = (BATCH, spec.num_kv_heads, PAST, spec.head_dim)
        out_dims = (BATCH, spec.num_kv_heads, TOTAL, spec.head_dim)
        full = []
        for kind, new in (("key", key), ("value", value)):
            past = self.graph_input(past_name(kind, slot), ValueType(spec.dtype, dims))
            present = present_name(kind, slot)
            if scale is not None:
                # Concat in float32, then quantize the whole cache: quantizing a dequantized fp8
                # value with the same scale gives it back exactly, and onnxruntime's CPU
                # provider has no float8 Concat.
                new32 = self.emit("Cast", [new], {"to": TensorProto.FLOAT})
                both = self.emit(
                    "Concat", [emit_dequantize(self, past, scale, out_dtype="float32"), new32], {"axis": 2}
                )
                self.emit("QuantizeLinear", [both, scale], {"output_dtype": onnx_type(spec.dtype)}, outputs=[present])
                full.append(emit_dequantize(self, present, scale))
            elif spec.dtype != self.compute_dtype:
                stored = self.emit("Cast", [new], {"to": onnx_type(spec.dtype)})
                self.emit("Concat", [past, stored], {"axis": 2}, outputs=[present])
                full.append(self.emit("Cast", [present], {"to": self.compute_type}))
            else:
                full.append(self.emit("Concat", [past, new], {"axis": 2}, outputs=[present]))
            self.outputs_made[present] = ValueType(spec.dtype, out_dims)
        return full[0], full[1]

    # --- weights and constants --------------------------------------------------------------

    def weight(self, node: Node, role: str) -> torch.Tensor | None:
        """The IR weight tensor of ``node``'s parameter ``role`` (None when absent)."""
        name = node.params.get(role)
        return None if name is None else self.weights[name]

    def param(self, node: Node, role: str, *, transpose: bool = False) -> str | None:
        """Initializer holding ``node``'s parameter ``role`` in its IR dtype (None when absent).

        ``transpose=True`` stores the 2-D weight transposed, named ``<param>.T``: linear weights
        are [out, in] in the IR and MatMul wants [in, out].
        """
        pname = node.params.get(role)
        if pname is None:
            return None
        tensor = self.weights[pname]
        declared = self.graph.params[pname].dtype
        if transpose:
            return self.initializer(f"{pname}.T", tensor.t(), declared)
        return self.initializer(pname, tensor, declared)

    def initializer(self, name: str, tensor: torch.Tensor | np.ndarray, dtype: str | None = None) -> str:
        """Add ``tensor`` as initializer ``name`` of IR/ONNX dtype ``dtype`` (default: the tensor's).

        Large tensors are stored once per rank in the external data file, so two segments (or
        two lowerings) asking for the same name share the bytes. ``dtype`` "int4"/"uint4" packs
        an int8/uint8 tensor of in-range values two to a byte.
        """
        if name in self.initializers:
            return name
        if dtype is None:
            dtype = _dtype_name(tensor)
        dims = tuple(tensor.shape)
        data = tensor_bytes(tensor, dtype)
        elem = onnx_type(dtype)
        if len(data) >= EXTERNAL_THRESHOLD:
            proto = self.data.tensor(name, data, dims, elem)
        else:
            proto = helper.make_tensor(name, elem, dims, data, raw=True)
        self.initializers[name] = proto
        self._dtypes[name] = dtype
        return name

    def const(self, value: Any, dtype: str = "int64") -> str:
        """A small inline constant (a number or nested list) of ``dtype``, shared by value."""
        array = np.asarray(value)
        key = (dtype, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"{self.name}/const_{len(self._consts)}"
            tensor = torch.from_numpy(np.asarray(value, dtype=np.float64 if array.dtype.kind == "f" else np.int64))
            self.initializer(name, tensor, dtype)
            self._consts[key] = name
        return self._consts[key]

    # --- nodes ------------------------------------------------------------------------------

    def emit(
        self,
        op_type: str,
        inputs: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        *,
        outputs: int | Sequence[str] = 1,
        dtype: str | None = None,
    ) -> str | list[str]:
        """Append ONNX node ``op_type`` (standard domain); return its output name(s).

        ``outputs`` is a count (names are generated) or explicit names. Empty strings in
        ``inputs`` skip optional inputs. ``dtype`` records the output's IR dtype for
        :meth:`dtype_of` (helpers such as :func:`emit_dequantize` set it).
        """
        names = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node_name = f"{self._scope or self.name}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **dict(attrs or {})))
        if dtype is not None:
            for n in names:
                self._dtypes[n] = dtype
        return names[0] if len(names) == 1 else names


def _dtype_name(tensor: torch.Tensor | np.ndarray) -> str:
    from compiler_core.dtypes import dtype_name

    if isinstance(tensor, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(tensor))
    try:
        return dtype_name(tensor.dtype)
    except KeyError:
        raise ValueError(f"tensor dtype {tensor.dtype} has no ONNX element type") from None


# --- quantize / dequantize helpers ---------------------------------------------------------


def _as_value(ctx: OnnxLowering, x: str | torch.Tensor, hint: str) -> str:
    if isinstance(x, str):
        return x
    return ctx.initializer(ctx.fresh(hint), x)


def emit_dequantize(
    ctx: OnnxLowering,
    q: str | torch.Tensor,
    scale: str | torch.Tensor,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    out_dtype: str | None = None,
) -> str:
    """``DequantizeLinear(q, scale)`` cast to ``out_dtype`` (default: the compute dtype).

    * FP8 per tensor: ``q`` float8_e4m3fn, ``scale`` a scalar.
    * Per channel: ``scale`` 1-D along ``axis``.
    * Blocked (INT4 AWQ): ``scale`` has ``q``'s rank with ``scale.shape[axis] = q.shape[axis] /
      block_size``. Symmetric only: TensorRT rejects non-zero zero points, so none is passed.

    ``q`` and ``scale`` are value names (e.g. from :meth:`OnnxLowering.initializer`) or tensors
    (added as initializers). The DequantizeLinear output has the scale's type, which is what a
    strongly typed TensorRT network requires; a Cast follows only when it differs from ``out_dtype``.
    """
    q = _as_value(ctx, q, "q")
    scale = _as_value(ctx, scale, "scale")
    attrs: dict[str, Any] = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    scale_dtype = ctx.dtype_of(scale) or "float32"
    out = ctx.emit("DequantizeLinear", [q, scale], attrs, dtype=scale_dtype)
    want = out_dtype or ctx.compute_dtype
    if want != scale_dtype:
        out = ctx.emit("Cast", [out], {"to": onnx_type(want)}, dtype=want)
    return out


def emit_quantize(
    ctx: OnnxLowering,
    x: str,
    scale: str | torch.Tensor,
    *,
    out_dtype: str = "float8_e4m3fn",
    axis: int | None = None,
    x_dtype: str | None = None,
) -> str:
    """``QuantizeLinear(x, scale)`` to ``out_dtype`` (saturating for float8), symmetric.

    ``x`` (of IR dtype ``x_dtype``, default the compute dtype) is cast to the scale's type first,
    since QuantizeLinear needs both to match.
    """
    scale = _as_value(ctx, scale, "scale")
    scale_dtype = ctx.dtype_of(scale) or "float32"
    if (x_dtype or ctx.compute_dtype) != scale_dtype:
        x = ctx.emit("Cast", [x], {"to": onnx_type(scale_dtype)}, dtype=scale_dtype)
    attrs: dict[str, Any] = {"output_dtype": onnx_type(out_dtype)}
    if axis is not None:
        attrs["axis"] = axis
    return ctx.emit("QuantizeLinear", [x, scale], attrs, dtype=out_dtype)


def emit_matmul(
    ctx: OnnxLowering, x: str, weight_in_out: str, bias: str | None = None, outputs: Sequence[str] | None = None
) -> str:
    """``x @ weight_in_out (+ bias)``: a linear layer whose weight value is already [in, out]."""
    if bias is None:
        return ctx.emit("MatMul", [x, weight_in_out], outputs=outputs or 1)
    product = ctx.emit("MatMul", [x, weight_in_out])
    return ctx.emit("Add", [product, bias], outputs=outputs or 1)
