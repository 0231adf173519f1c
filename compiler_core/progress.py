"""Progress bars on stderr for long work (conversion, calibration, build, summarization)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None, enable: bool = True
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr (no bar when disabled or not installed)."""
    if not enable:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
