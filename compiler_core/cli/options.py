"""Click helpers shared by the commands."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from compiler_core.errors import OptionError, OutputPathError


def option(*decls: str, **kwargs: Any):
    """A click option that accepts both ``--model_dir`` and ``--model-dir`` spellings."""
    names: list[str] = []
    for decl in decls:
        names.append(decl)
        if decl.startswith("--"):
            body = decl[2:]
            for alt in (body.replace("_", "-"), body.replace("-", "_")):
                if alt != body and f"--{alt}" not in names:
                    names.append(f"--{alt}")
    return click.option(*names, **kwargs)


def accepted_flag(name: str, help: str, takes_value: bool = False, optional_value: bool = False):
    """A TensorRT-LLM flag accepted for copy-paste compatibility; ``help`` says what it means here.

    ``optional_value`` accepts both the bare flag of older TensorRT-LLM releases
    (``--remove_input_padding``) and the value form of newer ones (``--remove_input_padding enable``).
    """
    if optional_value:
        return option(
            name, is_flag=False, flag_value="enable", default=None, metavar="[VALUE]", help=help, expose_value=False
        )
    if takes_value:
        return option(name, default=None, help=help, expose_value=False)
    return option(name, is_flag=True, default=False, help=help, expose_value=False)


def _flag(param: click.Parameter | None) -> str:
    """The flag a value was given for, as the user spelled it in --help (``--temperature``)."""
    if param is None:
        return "value"
    return next((o for o in getattr(param, "opts", []) if o.startswith("--")), param.name or "value")


class FiniteFloat(click.ParamType):
    """A float flag that refuses NaN and infinities, and values outside [minimum, maximum]."""

    name = "float"

    def __init__(self, minimum: float | None = None, maximum: float | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{_flag(param)} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise OptionError(f"{_flag(param)} must be a finite number, got {value}")
        low, high = self.minimum, self.maximum
        if (low is not None and number < low) or (high is not None and number > high):
            bound = (
                f"in [{low}, {high}]"
                if low is not None and high is not None
                else f">= {low}"
                if low is not None
                else f"<= {high}"
            )
            raise OptionError(f"{_flag(param)} must be {bound}, got {value}")
        return number


class IntAtLeast(click.ParamType):
    """An integer flag of at least ``minimum`` (1 for sizes and counts, 0 for ids and offsets)."""

    name = "integer"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                raise OptionError(f"{_flag(param)} must be an integer, got {value!r}") from None
        if number < self.minimum:
            raise OptionError(f"{_flag(param)} must be at least {self.minimum}, got {number}")
        return number


#: A size or count (>= 1), and a token id, seed or other non-negative integer (>= 0).
POSITIVE_INT = IntAtLeast(1)
NON_NEGATIVE_INT = IntAtLeast(0)


def _writable_parent(path: Path, flag: str) -> None:
    """Refuse ``path`` when its nearest existing ancestor is not a directory this process can write."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: directory {ancestor} is not writable")


class OutputPath(click.ParamType):
    """A path to write: a file (``--output_json``) or a directory (``--output_dir``), checked before any work.

    Refused: an existing path of the other kind, a path below a regular file, or one in a
    directory that cannot be written; so the error comes first, not after an hour of work.
    """

    name = "path"

    def __init__(self, directory: bool) -> None:
        self.directory = directory

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path, flag = Path(value), _flag(param)
        if str(value) == "":
            raise OutputPathError(f"{flag}: empty path")
        if self.directory and path.exists() and not path.is_dir():
            raise OutputPathError(f"{flag} {path}: exists and is not a directory")
        if not self.directory and path.is_dir():
            raise OutputPathError(f"{flag} {path}: is a directory; name a file to write")
        _writable_parent(path, flag)
        return path


OUTPUT_DIR = OutputPath(directory=True)
OUTPUT_FILE = OutputPath(directory=False)
