"""The ``modelc`` command group. Every subcommand, the core's included, arrives through the
``register_commands`` hook.

The group's context object (``ctx.obj``) is the :class:`~compiler_core.host.Host` of the run:
:func:`main` loads it once, and commands take it with ``@click.pass_obj`` and pass its registry down.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import click

from compiler_core.errors import ModelcError, OptionError, UsageError, error_line, unexpected
from compiler_core.host import Host
from compiler_core.interrupts import Interrupted, interrupts_raised
from compiler_core.plugins import PluginLoadWarning


def context_host(ctx: click.Context) -> Host:
    """The host on ``ctx``; a group invoked without one (click's test runner) loads the installed plugins."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = Host.load()
    return root.obj


class ModelcGroup(click.Group):
    """Takes its subcommands from the host's plugins and turns errors into one line plus an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *context_host(ctx).commands.commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or context_host(ctx).commands.commands.get(name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            error = as_modelc_error(exc)
            if not error.quiet:
                click.echo(error_line(error), err=True)
            ctx.exit(error.exit_code)


def as_modelc_error(exc: Exception) -> ModelcError:
    """``exc`` as the ModelcError that reports it: click's own usage errors become one line with exit
    2, and as the last resort whatever no validation anticipated becomes an InternalError (exit 1)."""
    if isinstance(exc, ModelcError):
        return exc
    if isinstance(exc, click.UsageError):
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        return OptionError(exc.format_message() + hint)
    if isinstance(exc, click.ClickException):
        return UsageError(exc.format_message())
    return unexpected(exc)


@click.group(cls=ModelcGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="modelc", prog_name="modelc")
def cli(debug: bool) -> None:
    """modelc: compile Hugging Face decoder-only LLMs into quantized, sharded engines.

    Workflow: convert (or quantize) -> build -> run / summarize.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """Plugin-load warnings are one line naming the plugin; other warnings keep Python's format."""
    if issubclass(category, PluginLoadWarning):
        click.echo(f"modelc: warning: {message}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    """The ``modelc`` console script (also ``python -m compiler_core``)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    warnings.showwarning = _show_warning
    try:
        with interrupts_raised():  # SIGINT/SIGTERM unwind every `with`: temporary dirs go, workers stop
            cli.main(args=argv, prog_name="modelc", standalone_mode=True, obj=Host.load())
    except Exception as exc:  # raised outside a command's invoke (e.g. while loading plugins)
        if debug:
            traceback.print_exc()
        error = as_modelc_error(exc)
        if not error.quiet:
            click.echo(error_line(error), err=True)
        sys.exit(error.exit_code)
    except Interrupted as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"modelc: error: {exc}", err=True)
        sys.exit(exc.exit_code)
