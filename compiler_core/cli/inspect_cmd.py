"""``modelc inspect``: summarise a checkpoint or engine directory."""

from __future__ import annotations

from pathlib import Path

import click

from compiler_core.formats.inspect import describe
from compiler_core.host import Host


@click.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--nodes", "max_nodes", default=40, show_default=True, help="Nodes to list per graph (-1: all).")
@click.pass_obj
def inspect_command(host: Host, directory: Path, max_nodes: int) -> None:
    """Print the IR and weights summary of a checkpoint or engine directory."""
    click.echo(describe(host.registry, directory, None if max_nodes < 0 else max_nodes))
