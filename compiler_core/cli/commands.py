"""The core's commands, registered through ``register_commands`` by compiler_core.builtin."""

from compiler_core.cli.build_cmd import build_command
from compiler_core.cli.convert_cmd import convert_command
from compiler_core.cli.inspect_cmd import inspect_command
from compiler_core.cli.plugins_cmd import plugins_command
from compiler_core.cli.quantize_cmd import quantize_command
from compiler_core.cli.run_cmd import run_command
from compiler_core.cli.summarize_cmd import summarize_command
from compiler_core.cli.verify_cmd import verify_command
from compiler_core.serve.command import serve_command

CORE_COMMANDS = (
    convert_command,
    quantize_command,
    build_command,
    run_command,
    summarize_command,
    serve_command,
    verify_command,
    inspect_command,
    plugins_command,
)
