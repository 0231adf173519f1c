"""``modelc run``."""

from __future__ import annotations

import click

from compiler_core.errors import ModelcError


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def run_command() -> None:
    """Not built yet in this version of modelc."""
    raise ModelcError("'modelc run' is not built yet in this version")
