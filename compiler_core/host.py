"""The host: the plugins one modelc run uses, loaded once and passed down (as pytest passes ``config``).

The CLI builds one at start and puts it on the click context (``ctx.obj``); Python code builds its
own with :meth:`Host.load` and hands ``host.registry`` to the stage functions. Nothing is cached
per process, so a test or an application can hold several hosts with different plugins.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import pluggy

from compiler_core import plugins
from compiler_core.plugins import (
    CORE_PLUGIN,
    PluginFailure,
    core_version,
    dist_facts,
    load_entry_points,
    new_plugin_manager,
    register_checked,
)
from compiler_core.registry import CommandTable, Registry, collect_commands


class Host:
    """A plugin manager, the registry its ``register_*`` hooks build, and the CLI commands they add.

    The registry and the commands are built on first use, each on its own, so ``modelc --help``
    works even when an architecture or a backend fails to register.
    """

    def __init__(self, pm: pluggy.PluginManager, failures: list[PluginFailure] | None = None) -> None:
        self.pm = pm
        #: Entry points that were left out, and why (``modelc plugins`` lists them).
        self.failures = list(failures or [])

    @classmethod
    def load(cls, extra: Mapping[str, object] | None = None) -> Host:
        """The core plus every installed plugin ``MODELC_PLUGINS`` allows, plus ``extra`` (name -> plugin
        object, registered after the entry points, as a test registers a throwaway plugin)."""
        pm = new_plugin_manager()
        failures = load_entry_points(pm)
        for name, plugin in (extra or {}).items():
            register_checked(pm, plugin, name)
        return cls(pm, failures)

    @classmethod
    def with_plugins(cls, chosen: Mapping[str, object]) -> Host:
        """The core plus exactly ``chosen`` (name -> plugin object), no entry points: a host for a
        test or an application that picks its plugins itself."""
        pm = new_plugin_manager()
        for name, plugin in chosen.items():
            register_checked(pm, plugin, name)
        return cls(pm)

    @cached_property
    def registry(self) -> Registry:
        """The ops, architectures, quantization schemes and backends the plugins registered."""
        return Registry(self.pm)

    @cached_property
    def commands(self) -> CommandTable:
        """The CLI subcommands the plugins added (the core's included)."""
        return collect_commands(self.pm)

    def plugin_info(self) -> list[dict[str, Any]]:
        """One dict per plugin: name, version, package, module, hooks, provides and status.

        ``provides`` maps a kind ("architectures", "backends", "commands", "decompositions",
        "fused_patterns", "lowerings", "ops", "quant_schemes") to the names the plugin registered
        (a lowering as ``backend:op``, a fused pattern as ``backend:name``); ``status`` is "loaded"
        or "failed" (then ``error`` says why).
        """
        owners = {**self.registry.provided_by, **self.commands.provided_by}
        dists = {ep.name: dist_facts(ep) for ep in plugins.entry_points()}
        provides: dict[str, dict[str, list[str]]] = {}
        for (kind, name), owner in owners.items():
            provides.setdefault(owner, {}).setdefault(kind, []).append(name)
        info = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # a blocked name
                continue
            if name == CORE_PLUGIN[0]:
                package, version = "modelc", core_version()
            else:
                package, version = dists.get(name, (None, None))
                version = version or getattr(plugin, "__version__", None)
            info.append(
                {
                    "name": name,
                    "version": version,
                    "package": package,
                    "module": getattr(plugin, "__name__", type(plugin).__name__),
                    "hooks": sorted(h.name for h in self.pm.get_hookcallers(plugin) or []),
                    "provides": {k: sorted(v) for k, v in sorted(provides.get(name, {}).items())},
                    "status": "loaded",
                }
            )
        for failure in self.failures:
            info.append(
                {
                    "name": failure.name,
                    "version": failure.version,
                    "package": failure.package,
                    "module": failure.value,
                    "hooks": [],
                    "provides": {},
                    "status": "failed",
                    "error": failure.error,
                }
            )
        return info


def load_registry() -> Registry:
    """The registry of a freshly loaded :class:`Host`: what Python API entry points use when their
    caller passes none (the same plugins the CLI would load)."""
    return Host.load().registry
