"""What a GEMM kernel may apply to its float32 output tile before the one rounding to its dtype.

An MLP's first linear is read by a GELU, and in an INT4-AWQ engine the GELU's output is scaled
per channel before the next linear (``channel_scale``). Run as their own kernels these are two
launches per layer that each read and write the activation: at one row a decode step of
falcon-7b spent about as long in them as in a small GEMM. Here the GEMM's last store applies
them (:func:`.splitk.finish`, called by :func:`.splitk.store_tile`), and :class:`Epilogue` says
which, as the fused lowering found them in the graph (``compiler_core.backends.torch.fused.epilogue``).
This module imports no Triton: the fused lowerings use it on every device.

The fused form rounds once, after the GELU and the scale; the unfused ops round the GEMM's output,
the GELU's and the product's. The two agree to a few units in the last place of the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: ``Epilogue.activation`` values: torch's ``F.gelu`` ``approximate`` argument, "" for none.
ACTIVATIONS = ("", "none", "tanh")


@dataclass(frozen=True)
class Epilogue:
    """``y -> column_scale * gelu(y)``, either part optional.

    ``activation``: "" for no GELU, else the GELU's ``approximate`` ("none": erf, "tanh").
    ``column_scale``: one factor per output column (``[out]``, the compute dtype), or None.
    """

    activation: str = ""
    column_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"epilogue activation {self.activation!r}: not one of {ACTIVATIONS}")

    def __bool__(self) -> bool:
        return bool(self.activation) or self.column_scale is not None

    def scale_operand(self, columns: int, placeholder: torch.Tensor) -> torch.Tensor:
        """The column scale as the kernels read it (contiguous ``[columns]``), ``placeholder`` without one."""
        if self.column_scale is None:
            return placeholder
        if tuple(self.column_scale.shape) != (columns,):
            raise ValueError(f"epilogue column scale of shape {tuple(self.column_scale.shape)} for {columns} columns")
        return self.column_scale.contiguous()

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The epilogue as the unfused ops compute it (each rounding to ``y``'s dtype)."""
        if self.activation:
            y = F.gelu(y, approximate=self.activation)
        if self.column_scale is not None:
            y = y * self.column_scale
        return y


#: The epilogue of a GEMM that has none.
NONE = Epilogue()
