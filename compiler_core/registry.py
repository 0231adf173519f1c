"""What plugins register, and the registries the core builds from their ``register_*`` calls."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler_core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from compiler_core.ir import Graph, OpSpec
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

        ``model`` is a :class:`compiler_core.convert.LoadedModel`, ``calibration`` a
        :class:`compiler_core.calibration.CalibrationSet`; return the quantized LoadedModel
        with its ``quantization`` section filled in.
        """


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


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same activation, produced by node ``producer``."""

    producer: str
    linears: tuple[str, ...]


class Registry:
    """Name -> object tables built from every plugin's ``register_*`` hook."""

    def __init__(self, pm) -> None:
        self.ops: dict[str, OpSpec] = self._collect(pm, "register_ops", "op")
        self.architectures: dict[str, Architecture] = self._collect(pm, "register_architectures", "architecture")
        self.quant_schemes: dict[str, QuantScheme] = self._collect(pm, "register_quant_schemes", "quant scheme")
        self.backends: dict[str, Backend] = self._collect(pm, "register_backends", "backend")
        self.provided_by: dict[tuple[str, str], str] = dict(self._owners)

    def _collect(self, pm, hook_name: str, kind: str) -> dict[str, Any]:
        if not hasattr(self, "_owners"):
            self._owners: dict[tuple[str, str], str] = {}
        table: dict[str, Any] = {}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            owner = impl.plugin_name

            def register(obj: Any, _owner: str = owner) -> None:
                name = obj.name
                if name in table:
                    first = self._owners[(kind, name)]
                    raise RuntimeError(
                        f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {_owner!r}"
                    )
                table[name] = obj
                self._owners[(kind, name)] = _owner

            impl.function(register=register)
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


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use from the loaded plugins."""
    from compiler_core.plugins import get_plugin_manager

    return Registry(get_plugin_manager())


def ops_table() -> dict[str, OpSpec]:
    return get_registry().ops


def reset_registry() -> None:
    """Forget the registry (tests that register throwaway plugins call this)."""
    get_registry.cache_clear()
