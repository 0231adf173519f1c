"""What plugins register, and the registries the core builds from their ``register_*`` calls."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compiler_core.errors import ModelcError, UsageError
from compiler_core.plugins import PLUGINS_ENV

if TYPE_CHECKING:
    import pluggy
    import torch
    from pluggy import HookImpl

    from compiler_core.ir import Graph, OpSpec
    from compiler_core.lowering import LoweringTable
    from compiler_core.mapping import Mapping
    from compiler_core.runtime.session import RankSession


class Architecture(ABC):
    """A model family: how to recognise its Hugging Face configs and build its graphs."""

    #: The name stored in checkpoints' config.json ("architecture").
    name: str

    @abstractmethod
    def detect(self, hf_config: dict[str, Any]) -> bool:
        """True when a Hugging Face ``config.json`` (as a dict) describes this family."""

    @abstractmethod
    def config_from_hf(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """Normalise a Hugging Face config into this family's fields (JSON-serialisable).

        Raise ValueError naming the field for a config this architecture cannot represent.
        """

    @abstractmethod
    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str) -> Graph:
        """The IR graph of one rank: its pipeline stage's layers, with per-rank shapes."""

    def check_mapping(self, config: dict[str, Any], mapping: Mapping) -> None:  # noqa: B027
        """Raise ValueError when ``mapping`` cannot split this model (default: any split works)."""

    def num_layers(self, config: dict[str, Any]) -> int:
        """Number of decoder layers (used for pipeline stage ranges)."""
        return int(config["num_hidden_layers"])

    def source_layer(self, source_name: str) -> int | None:
        """The decoder layer a source-checkpoint tensor belongs to, or None for global tensors.

        Lets shard-by-shard conversion skip tensors outside a pipeline stage.
        """
        for part in source_name.split("."):
            if part.isdigit():
                return int(part)
        return None


class QuantScheme(ABC):
    """A post-training quantization format users choose with ``--qformat``."""

    name: str
    #: The ``quant_algo`` value written to a checkpoint's config.json.
    quant_algo: str
    description: str = ""

    def transform_graph(self, graph: Graph, config: dict[str, Any]) -> Graph:
        """Rewrite a rank's full-precision graph into the quantized form ``config`` describes.

        Called for every registered scheme whenever a graph is built from a checkpoint
        config; return ``graph`` unchanged when ``config["quantization"]`` is not this
        scheme's business.
        """
        return graph

    @abstractmethod
    def quantize(self, model: Any, calibration: Any, options: dict[str, Any]) -> Any:
        """Calibrate and quantize a full-precision single-rank model.

        ``model`` is a :class:`compiler_core.convert.from_hf.LoadedModel`, ``calibration`` a
        :class:`compiler_core.quantize.calibration.CalibrationSet`; return the quantized LoadedModel
        with its ``quantization`` section filled in.
        """

    #: ``--kv_cache_dtype`` values this scheme can store KV caches in (empty: none).
    kv_cache_dtypes: tuple[str, ...] = ()

    def quantize_kv_cache(self, model: Any, calibration: Any, options: dict[str, Any]) -> Any:
        """Calibrate and quantize only the KV cache to ``options["kv_cache_dtype"]``.

        Called after the weight scheme (if any) has run, so ``model`` may already be quantized;
        return it with ``kv_cache_quant_algo`` set. Only schemes listing ``kv_cache_dtypes``
        implement this.
        """
        raise NotImplementedError(f"quantization format {self.name!r} does not quantize KV caches")


class Backend(ABC):
    """An execution backend: builds per-rank artefacts and loads them for the runtime."""

    name: str
    description: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can build here, else one line saying what to install."""
        return None

    def preference(self) -> int:
        """How strongly this backend wants to be the default here (higher wins; <0 never)."""
        return -1

    def preference_reason(self) -> str:
        """Why :meth:`preference` is what it is on this machine, for ``build``'s printout (default: none)."""
        return ""

    @abstractmethod
    def build_rank(
        self,
        graph: Graph,
        weights: dict[str, torch.Tensor],
        out_dir: Path,
        rank: int,
        settings: dict[str, Any],
    ) -> dict[str, Any]:
        """Write rank ``rank``'s artefacts into ``out_dir``; return facts to record in config.json."""

    @abstractmethod
    def load_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int, device: str) -> RankSession:
        """Load rank ``rank`` of a built engine for execution on ``device``."""

    def describe_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int) -> str:
        """Extra lines about rank ``rank``'s artefacts for ``modelc inspect`` (default: none)."""
        return ""


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same activation, produced by node ``producer``."""

    producer: str
    linears: tuple[str, ...]


class Registry:
    """Name -> object tables built from every plugin's ``register_*`` hook.

    ``provided_by`` maps (kind, name) to the plugin that registered it; kinds are the
    attribute names ("ops", "architectures", "quant_schemes", "backends") and, for
    :attr:`lowerings`, "lowerings", "decompositions" and "fused_patterns".
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        from compiler_core.ir import OpSpec

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
        from compiler_core.lowering import LoweringTable
        from compiler_core.lowering.table import registration_key

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


@functools.cache
def get_commands() -> CommandTable:
    """Collect subcommands plugin by plugin, so a name two plugins add is an error naming both.

    Kept apart from :func:`get_registry` so ``modelc --help`` does not depend on every
    architecture, scheme and backend registering cleanly.
    """
    from compiler_core.plugins import get_plugin_manager

    commands: dict[str, click.Command] = {}
    owners: dict[tuple[str, str], str] = {}
    for impl in _plain_impls(get_plugin_manager(), "register_commands"):
        scratch = click.Group()
        _call_impl(impl, "register_commands", cli=scratch)
        for name, command in scratch.commands.items():
            _claim(owners, "commands", "command", name, impl.plugin_name)
            commands[name] = command
    return CommandTable(commands, owners)


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use from the loaded plugins."""
    from compiler_core.plugins import get_plugin_manager

    return Registry(get_plugin_manager())


def ops_table() -> dict[str, OpSpec]:
    """The op signatures every loaded plugin registered."""
    return get_registry().ops


def reset_registry() -> None:
    """Forget the registry and commands (tests that register throwaway plugins call this)."""
    get_registry.cache_clear()
    get_commands.cache_clear()
