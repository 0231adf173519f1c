"""``modelc quantize``."""

from __future__ import annotations

import click

from compiler_core.errors import ModelcError


@click.command("quantize", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def quantize_command() -> None:
    """Not built yet in this version of modelc."""
    raise ModelcError("'modelc quantize' is not built yet in this version")
