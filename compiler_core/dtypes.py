"""The one table of element types: IR name, torch dtype and safetensors code of each.

Every other mapping (IR name -> torch, torch -> IR name, safetensors code <-> torch, the dtypes a
checkpoint or a graph parameter may have) is derived from :data:`ELEMENT_TYPES`, so adding a type
is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElementType:
    """One element type under its three names."""

    #: The name in IR graphs and config files ("bfloat16").
    name: str
    torch: torch.dtype
    #: The code in safetensors headers ("BF16").
    safetensors: str
    #: True when an IR graph parameter may have this type.
    in_ir: bool = True
    #: True when a checkpoint's (unquantized) model dtype may be this type.
    model_dtype: bool = False


ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType("float32", torch.float32, "F32", model_dtype=True),
    ElementType("float16", torch.float16, "F16", model_dtype=True),
    ElementType("bfloat16", torch.bfloat16, "BF16", model_dtype=True),
    ElementType("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3"),
    ElementType("int8", torch.int8, "I8"),
    ElementType("uint8", torch.uint8, "U8"),
    ElementType("int32", torch.int32, "I32"),
    ElementType("int64", torch.int64, "I64"),
    # Readable from a source checkpoint, never part of a graph.
    ElementType("float64", torch.float64, "F64", in_ir=False),
    ElementType("float8_e5m2", torch.float8_e5m2, "F8_E5M2", in_ir=False),
    ElementType("int16", torch.int16, "I16", in_ir=False),
    ElementType("uint16", torch.uint16, "U16", in_ir=False),
    ElementType("uint32", torch.uint32, "U32", in_ir=False),
    ElementType("uint64", torch.uint64, "U64", in_ir=False),
    ElementType("bool", torch.bool, "BOOL", in_ir=False),
)

#: Element types a graph parameter may have.
IR_DTYPES: tuple[str, ...] = tuple(t.name for t in ELEMENT_TYPES if t.in_ir)
#: dtypes of an unquantized checkpoint (``convert --dtype``).
MODEL_DTYPES: tuple[str, ...] = tuple(t.name for t in ELEMENT_TYPES if t.model_dtype)

_BY_NAME = {t.name: t for t in ELEMENT_TYPES}
_BY_TORCH = {t.torch: t for t in ELEMENT_TYPES}
_BY_SAFETENSORS = {t.safetensors: t for t in ELEMENT_TYPES}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an IR element type name; KeyError for an unknown name."""
    return _BY_NAME[name].torch


def dtype_name(dtype: torch.dtype) -> str:
    """The IR/config name of a torch dtype; KeyError for one the table does not hold."""
    return _BY_TORCH[dtype].name


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of a torch dtype; KeyError for one the table does not hold."""
    return _BY_TORCH[dtype].safetensors


def from_safetensors_code(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors header code, or None for a code the table does not hold."""
    found = _BY_SAFETENSORS.get(code)
    return None if found is None else found.torch
