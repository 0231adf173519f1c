"""Atomic directory output and safe JSON reading."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler_core.errors import UsageError


@contextlib.contextmanager
def atomic_output_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and an existing ``target`` is left
    exactly as it was. The swap is two renames on the same file system.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
    tmp.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """Parse a JSON object from ``path`` or raise UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
