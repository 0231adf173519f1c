"""The typed layer-graph IR."""

from compiler_core.dtypes import IR_DTYPES as DTYPES
from compiler_core.ir.graph import IR_VERSION, Graph, GraphBuilder, Node, Param
from compiler_core.ir.ops import CORE_OPS, OpSpec
from compiler_core.ir.passes import run_passes
from compiler_core.ir.printer import format_graph
from compiler_core.ir.validate import GraphError, validate

__all__ = [
    "CORE_OPS",
    "DTYPES",
    "IR_VERSION",
    "Graph",
    "GraphBuilder",
    "GraphError",
    "Node",
    "OpSpec",
    "Param",
    "format_graph",
    "run_passes",
    "validate",
]
