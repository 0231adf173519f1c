"""Plugin loading: a plugin manager with modelc's hookspecs, filled from entry points, broken ones reported.

Plugins are found through the ``compiler_core`` entry-point group, the built-in ones
included: the core never names a plugin. A plugin that raises while importing, implements a
hook that does not exist (a misspelt name) or has a hook whose signature does not match its
spec is left out, reported with a :class:`PluginLoadWarning` and listed as ``failed`` by
``modelc plugins``; everything else keeps working.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from compiler_core import hookspecs

ENTRY_POINT_GROUP = "compiler_core"
#: Comma-separated entry-point names to load; unset loads all, empty loads none.
PLUGINS_ENV = "MODELC_PLUGINS"
#: Set to 1 to print every hook call.
TRACE_ENV = "MODELC_TRACE_PLUGINS"
#: The core's own hook implementations; they always load and cannot be filtered out.
CORE_PLUGIN = ("core", "compiler_core.builtin")


class PluginLoadWarning(UserWarning):
    """A plugin was left out because it could not be loaded; the message names it."""


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that did not load: its name, what it points at and why it failed."""

    name: str
    value: str
    error: str
    package: str | None = None
    version: str | None = None


def entry_points() -> Iterable[Any]:
    """The installed ``compiler_core`` entry points (one per plugin, deduplicated by package)."""
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def allowed_plugins() -> set[str] | None:
    """The entry-point names ``MODELC_PLUGINS`` allows, or None when it is unset (all)."""
    wanted = os.environ.get(PLUGINS_ENV)
    return None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with modelc's hookspecs and the core's own plugin, and nothing else.

    :class:`compiler_core.host.Host` starts from it before entry points are added; tests use it to
    check a plugin object in isolation (``pm.register(obj); pm.check_pending()``).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV) == "1":
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    name, module = CORE_PLUGIN
    pm.register(importlib.import_module(module), name=name)
    pm.check_pending()
    return pm


def register_checked(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register ``plugin`` as ``name`` and verify every hook it implements has a spec.

    On any problem the plugin is unregistered again, so the manager is left as it was, and
    the error propagates (``pluggy.PluginValidationError`` for a misspelt or mis-declared hook,
    with a "did you mean" hint where a spec name is close).
    """
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        _unregister_quietly(pm, plugin, name)
        raise pluggy.PluginValidationError(exc.plugin, _with_hint(str(exc), pm)) from None
    except BaseException:
        _unregister_quietly(pm, plugin, name)
        raise


def _unregister_quietly(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    if pm.get_plugin(name) is plugin:
        pm.unregister(plugin, name=name)


def _with_hint(message: str, pm: pluggy.PluginManager) -> str:
    """Append "did you mean 'x'?" when an unknown hook's name is close to a spec name."""
    unknown = re.search(r"unknown hook '([^']+)'", message)
    if unknown is None:
        return message
    specs = [n for n in vars(pm.hook) if not n.startswith("_") and getattr(pm.hook, n).has_spec()]
    close = difflib.get_close_matches(unknown.group(1), specs, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def dist_facts(ep: Any) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"], dist.version) if dist is not None else (None, None)


def load_entry_points(pm: pluggy.PluginManager) -> list[PluginFailure]:
    """Register every installed plugin ``MODELC_PLUGINS`` allows into ``pm``; return the ones left out.

    Each failure is also reported with a :class:`PluginLoadWarning`.
    """
    failures: list[PluginFailure] = []
    allowed = allowed_plugins()
    seen: dict[str, str | None] = {}
    for ep in entry_points():
        if allowed is not None and ep.name not in allowed:
            continue
        package, version = dist_facts(ep)
        if ep.name in seen or ep.name == CORE_PLUGIN[0]:
            owner = "the core" if ep.name == CORE_PLUGIN[0] else f"package {seen[ep.name] or ep.name!r}"
            _fail(failures, PluginFailure(ep.name, ep.value, f"the name is already taken by {owner}", package, version))
            continue
        seen[ep.name] = package
        try:
            register_checked(pm, ep.load(), ep.name)
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the CLI down with it
            # One line: pluggy's signature errors span several.
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            _fail(failures, PluginFailure(ep.name, ep.value, error, package, version))
    for name in sorted((allowed or set()) - set(seen) - {CORE_PLUGIN[0]}):
        warnings.warn(
            f"{PLUGINS_ENV} names {name!r}, but no installed plugin has that name", PluginLoadWarning, stacklevel=3
        )
    return failures


def _fail(failures: list[PluginFailure], failure: PluginFailure) -> None:
    failures.append(failure)
    warnings.warn(f"modelc plugin {failure.name!r} failed to load: {failure.error}", PluginLoadWarning, stacklevel=4)


def core_version() -> str:
    try:
        return importlib.metadata.version("modelc")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
