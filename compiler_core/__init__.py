"""modelc's core: the IR, hook specs, plugin manager, formats, runtime and CLI group."""

from compiler_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
