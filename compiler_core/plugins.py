"""The plugin manager: loads entry-point plugins lazily, once, and reports the broken ones."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import warnings
from dataclasses import dataclass

import pluggy

from compiler_core import hookspecs

ENTRY_POINT_GROUP = "compiler_core"
#: Comma-separated entry-point names to load; unset loads all, empty loads none.
PLUGINS_ENV = "MODELC_PLUGINS"
#: Set to 1 to print every hook call.
TRACE_ENV = "MODELC_TRACE_PLUGINS"
#: The core's own hook implementations; they always load and cannot be filtered out.
DEFAULT_PLUGINS = ("compiler_core.builtin",)


@dataclass(frozen=True)
class PluginFailure:
    name: str
    error: str


_pm: pluggy.PluginManager | None = None
failures: list[PluginFailure] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading plugins on the first call."""
    global _pm
    if _pm is None:
        _pm = _load()
    return _pm


def _load() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("compiler_core")
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV) == "1":
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name="core")
    wanted = os.environ.get(PLUGINS_ENV)
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    failures.clear()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the CLI down with it
            failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}"))
            warnings.warn(f"modelc plugin {ep.name!r} failed to load: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
    pm.check_pending()
    return pm


def reset_plugin_manager() -> None:
    """Forget the loaded plugins; the next call loads them again (for tests)."""
    global _pm
    _pm = None
    from compiler_core.registry import reset_registry

    reset_registry()


def plugin_info() -> list[dict]:
    """One dict per plugin: name, version, the hooks it implements and what it registered."""
    from compiler_core.registry import get_registry

    pm = get_plugin_manager()
    registry = get_registry()
    dists = {ep.name: ep.dist for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None}
    provides: dict[str, dict[str, list[str]]] = {}
    for (kind, name), owner in registry.provided_by.items():
        provides.setdefault(owner, {}).setdefault(kind + "s", []).append(name)
    info = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        info.append(
            {
                "name": name,
                "version": dist.version if dist else _core_version(),
                "package": dist.metadata["Name"] if dist else "modelc",
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "hooks": hooks,
                "provides": {k: sorted(v) for k, v in sorted(provides.get(name, {}).items())},
                "status": "loaded",
            }
        )
    for failure in failures:
        dist = dists.get(failure.name)
        info.append(
            {
                "name": failure.name,
                "version": dist.version if dist else None,
                "package": dist.metadata["Name"] if dist else None,
                "status": "failed",
                "error": failure.error,
            }
        )
    return info


def _core_version() -> str:
    try:
        return importlib.metadata.version("modelc")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
