"""SIGINT and SIGTERM as an exception that unwinds the stack, so every ``with`` block cleans up.

Python's default SIGTERM kills the process on the spot (temporary directories and worker processes
are left behind) and its SIGINT raises KeyboardInterrupt, which click turns into exit code 1.
:func:`interrupts_raised` makes both raise :class:`Interrupted` instead; the CLI exits with
128 + the signal number (130 / 143). :func:`signals_deferred` holds them over a few steps that
must not be split (the renames that swap an output directory into place, removing a temporary one).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` never swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class _RaiseOnce:
    """Raise Interrupted for the first signal; ignore repeats, so the cleanup they interrupt can finish."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:
            return
        self.raised = True
        raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raised() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread."""
    previous = _install(_RaiseOnce())
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers in place before.

    Python runs signal handlers only in the main thread, so elsewhere there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = _install(lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        _restore(previous)
        for signum in pending:
            signal.raise_signal(signum)


def _install(handler: Callable[[int, FrameType | None], object]) -> dict[int, object]:
    return {signum: signal.signal(signum, handler) for signum in HANDLED_SIGNALS}


def _restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        # None: the handler was installed outside Python; the default is the closest we can restore.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
