"""``modelc plugins``: what is loaded and what each plugin provides."""

from __future__ import annotations

import json
import os

import click

from compiler_core.cli.options import option
from compiler_core.host import Host
from compiler_core.plugins import PLUGINS_ENV


@click.command("plugins")
@option("--json", "as_json", is_flag=True, help="Print JSON: name, version, package, module, hooks, provides, status.")
@click.pass_obj
def plugins_command(host: Host, as_json: bool) -> None:
    """List plugins with their versions and what they provide.

    A plugin that failed to load is listed with status "failed" and the reason. Set
    MODELC_PLUGINS=name,name to load only some of the installed plugins.
    """
    info = host.plugin_info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        package = f" ({p['package']})" if p["package"] else ""
        head = f"{p['name']} {p['version'] or '(unknown version)'}{package}"
        if p["status"] == "failed":
            click.echo(f"{head}  FAILED: {p['error']}")
            continue
        click.echo(head)
        for kind, names in p["provides"].items():
            click.echo(f"    {kind.replace('_', ' ')}: {', '.join(names)}")
        if not p["provides"]:
            click.echo(f"    hooks: {', '.join(p['hooks']) or 'none'}")
    if os.environ.get(PLUGINS_ENV) is not None:
        click.echo(f"({PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r} restricts which installed plugins load)")
