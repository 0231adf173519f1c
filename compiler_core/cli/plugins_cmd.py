"""``modelc plugins``: what is loaded and what each plugin provides."""

from __future__ import annotations

import json

import click

from compiler_core.cli.options import option
from compiler_core.plugins import plugin_info


@click.command("plugins")
@option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json: bool) -> None:
    """List plugins with their versions and what they provide."""
    info = plugin_info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        if p["status"] == "failed":
            click.echo(f"{p['name']} {p['version'] or ''} FAILED: {p['error']}")
            continue
        provided = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["provides"].items()) or "hooks only"
        click.echo(f"{p['name']} {p['version']} ({p['package']}) - {provided}")
