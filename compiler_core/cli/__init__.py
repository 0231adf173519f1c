"""The ``modelc`` command group. Every subcommand, the core's included, arrives through the
``register_commands`` hook."""

from __future__ import annotations

import sys
import traceback

import click

from compiler_core.errors import ModelcError


class ModelcGroup(click.Group):
    """Loads plugin commands on first use and turns errors into one line plus an exit code."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            from compiler_core.plugins import get_plugin_manager

            type(self)._loaded = True
            get_plugin_manager().hook.register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModelcError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if not exc.quiet:
                click.echo(f"modelc: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=ModelcGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="modelc", prog_name="modelc")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """modelc: compile Hugging Face decoder-only LLMs into quantized, sharded engines.

    Workflow: convert (or quantize) -> build -> run / summarize.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="modelc", standalone_mode=True)
    except ModelcError as exc:  # raised outside a command's invoke (e.g. while loading commands)
        if debug:
            traceback.print_exc()
        click.echo(f"modelc: error: {exc}", err=True)
        sys.exit(exc.exit_code)
