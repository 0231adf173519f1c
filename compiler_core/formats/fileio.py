"""Atomic, non-destructive directory output and safe JSON reading."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler_core.errors import ConcurrentWriteError, ConfigError, UsageError
from compiler_core.interrupts import signals_deferred


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output directory, recognised by a field of the config.json there.

    An existing output directory is replaced only when it is empty or holds an earlier output of
    the same kind, so neither a Hugging Face model, nor another command's output, nor unrelated
    files are ever lost to a mistyped ``--output_dir``.
    """

    name: str  #: for messages, e.g. "modelc checkpoint"
    marker: str  #: the value of ``field`` in the config.json of such an output
    field: str = "format"

    def written_in(self, directory: Path) -> bool:
        """True when ``directory`` holds an output of this kind."""
        config = _config_json(directory)
        return config is not None and config.get(self.field) == self.marker


@contextlib.contextmanager
def atomic_output_dir(target: Path, kind: OutputKind, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    Refused with UsageError before anything is written: a ``target`` that is or contains one of
    ``inputs``, a symlink, a file, or a non-empty directory that holds no earlier output of ``kind``.
    On any exception, SIGINT and SIGTERM included, the temporary directory is removed and an
    existing ``target`` is left exactly as it was. The swap is two renames on the same file system
    (the old output stays in place until the new one is complete) done under a lock on the parent
    directory; a run that finds ``target`` changed since it started (another run finished into it
    first) raises ConcurrentWriteError and leaves that run's output in place.
    """
    target = Path(target)
    seen = _identity(target)
    check_output_dir(target, kind, inputs)
    new_parents = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{target}: cannot create its parent directory ({exc.strerror})") from None
    tmp = None
    try:
        with signals_deferred():  # a signal between mkdir and the assignment would leave it behind
            tmp = _fresh_sibling(target, "tmp")
        yield tmp
        with signals_deferred():  # never half-swapped
            _swap_in(tmp, target, seen)
    except BaseException:
        with signals_deferred():
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for parent in new_parents:  # innermost first; one that is no longer empty stays
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise


def check_output_dir(target: Path, kind: OutputKind, inputs: Iterable[Path] = ()) -> None:
    """Raise UsageError unless ``target`` may receive an output of ``kind`` (see :func:`atomic_output_dir`).

    :func:`atomic_output_dir` checks this itself; a command that works a long time before it writes
    calls it first as well, so that a refused directory costs no time.
    """
    for source in inputs:
        real_source, real_target = Path(source).resolve(), target.resolve()
        if real_source == real_target:
            raise UsageError(f"{target}: is the input {source} itself; choose another output directory")
        if real_target in real_source.parents:
            raise UsageError(f"{target}: contains the input {source}; choose another output directory")
    if target.is_symlink():
        raise UsageError(f"{target}: is a symbolic link; give the directory itself")
    if not target.exists():
        return
    if not target.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise UsageError(f"{target}: cannot read it ({exc.strerror})") from None
    if not empty and not kind.written_in(target):
        raise UsageError(
            f"{target}: {_what_it_holds(target)} and is not an earlier {kind.name}; refusing to replace it "
            "(choose a new or empty output directory)"
        )


def _what_it_holds(directory: Path) -> str:
    config = _config_json(directory)
    if config is None:
        return "is not empty"
    if isinstance(config.get("format"), str):
        return f"holds a {config['format']} output"
    if "model_type" in config:
        return f"holds a Hugging Face model (model_type {config['model_type']!r})"
    return "holds a config.json of another kind"


def _config_json(directory: Path) -> dict[str, Any] | None:
    """``directory/config.json`` as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself, None when absent: a directory renamed into place has a new one."""
    try:
        status = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status.st_dev, status.st_ino


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` itself: nothing is created, so nothing is left behind."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap_in(tmp: Path, target: Path, seen: tuple[int, int] | None) -> None:
    """Rename ``tmp`` to ``target`` (the old ``target`` aside first, removed after), if ``target`` is still ``seen``."""
    with _locked(target.parent):
        if _identity(target) != seen:
            raise ConcurrentWriteError(
                f"{target}: another run wrote this directory while this one was working; "
                "keeping that output and discarding this run's"
            )
        backup = None
        if seen is not None:
            backup = _fresh_sibling(target, "old")
            backup.rmdir()
            target.rename(backup)
        try:
            tmp.rename(target)
        except BaseException:
            if backup is not None:
                backup.rename(target)
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
        except OSError as exc:
            raise UsageError(f"{target.parent}: cannot write the output here ({exc.strerror})") from None
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
