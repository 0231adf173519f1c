"""Atomic directory output and safe JSON reading."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler_core.errors import ConfigError, UsageError

#: A directory whose contents may be replaced: empty, or holding a model/checkpoint/engine config.
REPLACEABLE_MARKER = "config.json"


@contextlib.contextmanager
def atomic_output_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and an existing ``target`` is left
    exactly as it was. The swap is two renames on the same file system; if the second fails,
    the old directory is put back. An existing ``target`` is only replaced when it is empty or
    holds a ``config.json`` (a previous output), so a mistyped ``--output_dir ~`` cannot wipe a
    home directory.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / REPLACEABLE_MARKER).is_file():
        raise UsageError(
            f"{target}: exists, is not empty and holds no {REPLACEABLE_MARKER}; refusing to replace it "
            "(choose a new or empty output directory)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(target, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = _fresh_sibling(target, "old")
        backup.rmdir()
        target.rename(backup)
    try:
        tmp.rename(target)
    except BaseException:
        if backup is not None:
            backup.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _fresh_sibling(target: Path, tag: str) -> Path:
    """Create a new hidden directory beside ``target``.

    Made with ``mkdir`` rather than ``tempfile.mkdtemp`` so the result gets the usual
    umask-derived permissions, not mkdtemp's 0700, once it is renamed into place.
    """
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{target.parent}: cannot create a temporary directory beside {target.name}")


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """Parse a JSON object from ``path`` or raise UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {what} cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def json_lines(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of JSONL ``text``; errors name ``source:line``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{source}:{number}: not a JSON object")
        yield number, record


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (used inside an atomic output directory)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
