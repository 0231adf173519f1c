"""Errors the CLI turns into one line on stderr and an exit code."""

from __future__ import annotations


class ModelcError(Exception):
    """A failure the user can act on; the message is the whole story."""

    exit_code = 1
    #: True when another process reports the same error (an mpirun rank other than 0): exit silently.
    quiet = False


class UsageError(ModelcError):
    """Bad input: a file, field, flag or value. Exit code 2."""

    exit_code = 2


class ConcurrentWriteError(ModelcError):
    """Another run finished into the same output directory first; its output is kept. Exit code 1."""
