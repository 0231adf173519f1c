"""Lowering: the (op, backend) table plugins fill and the one loop that lowers nodes with it.

* :mod:`compiler_core.lowering.table`: what a plugin registers through ``register_lowerings``
  (:class:`Lowering`, :class:`Decomposition`, :class:`FusedPattern` over a :class:`Pattern`) and the
  :class:`LoweringTable` the core builds from it.
* :mod:`compiler_core.lowering.plan`: :func:`plan_lowering`, which turns a node list into the steps a
  backend runs: a fused pattern where one matches, else the backend's lowering of the op, else the
  op's decomposition into core primitives, lowered the same way.
"""

from compiler_core.lowering.plan import LoweringStep, plan_lowering
from compiler_core.lowering.table import Decomposition, FusedPattern, Lowering, LoweringTable, Match, Pattern

__all__ = [
    "Decomposition",
    "FusedPattern",
    "Lowering",
    "LoweringStep",
    "LoweringTable",
    "Match",
    "Pattern",
    "plan_lowering",
]
