"""The registry: name -> object tables built from every plugin's ``register_*`` calls, and the CLI's commands.

One is built per :class:`compiler_core.host.Host` and passed down to whatever needs a table; the
types plugins register live in :mod:`compiler_core.api`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
import pluggy
from pluggy import HookImpl

from compiler_core.api import Architecture, Backend, QuantScheme
from compiler_core.errors import ModelcError, UsageError
from compiler_core.ir import OpSpec
from compiler_core.lowering import LoweringTable
from compiler_core.lowering.table import registration_key
from compiler_core.plugins import PLUGINS_ENV


class Registry:
    """Name -> object tables built from every plugin's ``register_*`` hook.

    ``provided_by`` maps (kind, name) to the plugin that registered it; kinds are the
    attribute names ("ops", "architectures", "quant_schemes", "backends") and, for
    :attr:`lowerings`, "lowerings", "decompositions" and "fused_patterns".
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.provided_by: dict[tuple[str, str], str] = {}
        self.ops: dict[str, OpSpec] = self._collect(pm, "register_ops", "ops", OpSpec)
        self.architectures: dict[str, Architecture] = self._collect(
            pm, "register_architectures", "architectures", Architecture
        )
        self.quant_schemes: dict[str, QuantScheme] = self._collect(
            pm, "register_quant_schemes", "quant_schemes", QuantScheme
        )
        self.backends: dict[str, Backend] = self._collect(pm, "register_backends", "backends", Backend)
        self.lowerings: LoweringTable = self._collect_lowerings(pm)

    def _collect(self, pm: pluggy.PluginManager, hook_name: str, kind: str, expected: type) -> dict[str, Any]:
        noun = _NOUNS[kind]
        table: dict[str, Any] = {}
        for impl in _plain_impls(pm, hook_name):
            owner = impl.plugin_name

            def register(obj: Any, _owner: str = owner) -> None:
                if not isinstance(obj, expected):
                    raise ModelcError(
                        f"plugin {_owner!r}: {hook_name} was given {type(obj).__name__}, not a {expected.__name__}"
                    )
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise ModelcError(f"plugin {_owner!r}: {hook_name} was given a {noun} without a name")
                _claim(self.provided_by, kind, noun, name, _owner)
                table[name] = obj

            _call_impl(impl, hook_name, register=register)
        return table

    def _collect_lowerings(self, pm: pluggy.PluginManager) -> LoweringTable:
        table = LoweringTable()
        for impl in _plain_impls(pm, "register_lowerings"):
            owner = impl.plugin_name

            def register(entry: Any, _owner: str = owner) -> None:
                try:
                    kind, name = registration_key(entry)
                except TypeError:
                    raise ModelcError(
                        f"plugin {_owner!r}: register_lowerings was given {type(entry).__name__}, "
                        "not a Lowering, Decomposition or FusedPattern"
                    ) from None
                _claim(self.provided_by, kind, _NOUNS[kind], name, _owner)
                table.add(entry)

            _call_impl(impl, "register_lowerings", register=register)
        return table

    def architecture_for_hf(self, hf_config: dict[str, Any], source: str) -> Architecture:
        found = [a for a in self.architectures.values() if a.detect(hf_config)]
        if not found:
            model_type = hf_config.get("model_type") or hf_config.get("architectures")
            raise UsageError(f"{source}: no loaded plugin supports model_type {model_type!r}")
        return found[0]

    def architecture(self, name: str, source: str) -> Architecture:
        return _lookup(self.architectures, name, "architecture", source)

    def quant_scheme(self, name: str, source: str) -> QuantScheme:
        return _lookup(self.quant_schemes, name, "quantization format", source)

    def backend(self, name: str, source: str) -> Backend:
        return _lookup(self.backends, name, "backend", source)


def _lookup(table: dict[str, Any], name: str, kind: str, source: str) -> Any:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise UsageError(f"{source}: unknown {kind} {name!r} (known: {known})") from None


_NOUNS = {
    "ops": "op",
    "architectures": "architecture",
    "quant_schemes": "quant scheme",
    "backends": "backend",
    "commands": "command",
    "lowerings": "lowering",
    "decompositions": "decomposition",
    "fused_patterns": "fused pattern",
}


def _claim(owners: dict[tuple[str, str], str], kind: str, noun: str, name: str, owner: str) -> None:
    """Record that ``owner`` registered ``name``; a second registration is an error naming both."""
    first = owners.get((kind, name))
    if first is not None:
        raise ModelcError(
            f"{noun} {name!r} is registered twice: by plugin {first!r} and by plugin {owner!r} "
            f"(uninstall one, or list the plugins to load in {PLUGINS_ENV})"
        )
    owners[(kind, name)] = owner


def _plain_impls(pm: pluggy.PluginManager, hook_name: str) -> list[HookImpl]:
    """A registration hook's implementations in registration order (the core's first).

    Wrappers are skipped: a registration hook has no result for them to wrap.
    """
    return [i for i in getattr(pm.hook, hook_name).get_hookimpls() if not (i.hookwrapper or i.wrapper)]


def _call_impl(impl: HookImpl, hook_name: str, **kwargs: Any) -> None:
    """Call one plugin's registration hook; its failure names the plugin."""
    try:
        impl.function(*(kwargs[a] for a in impl.argnames))
    except ModelcError:
        raise
    except Exception as exc:
        raise ModelcError(f"plugin {impl.plugin_name!r}: {hook_name} failed: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class CommandTable:
    """The CLI subcommands every plugin added through ``register_commands``, and who added each."""

    commands: dict[str, click.Command]
    provided_by: dict[tuple[str, str], str]


def collect_commands(pm: pluggy.PluginManager) -> CommandTable:
    """Collect subcommands plugin by plugin, so a name two plugins add is an error naming both.

    Kept apart from :class:`Registry` so ``modelc --help`` does not depend on every
    architecture, scheme and backend registering cleanly.
    """
    commands: dict[str, click.Command] = {}
    owners: dict[tuple[str, str], str] = {}
    for impl in _plain_impls(pm, "register_commands"):
        scratch = click.Group()
        _call_impl(impl, "register_commands", cli=scratch)
        for name, command in scratch.commands.items():
            _claim(owners, "commands", "command", name, impl.plugin_name)
            commands[name] = command
    return CommandTable(commands, owners)
