"""Execution backends that ship with the core."""
