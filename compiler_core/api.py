"""What a plugin registers: architectures, quantization schemes and backends, with the core's defaults.

A leaf module: it imports only the IR, the parallel mapping and the errors, so a plugin (and every
core stage) can import it without pulling in the plugin manager, the registry or the runtime.
Behaviour that depends on the model family or the scheme lives here as methods of the registered
object, not as hooks each plugin answers by checking whether the call is its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compiler_core.ir import Graph, Node
from compiler_core.mapping import Mapping, default_layer_ranges

if TYPE_CHECKING:
    from compiler_core.formats.checkpoint_config import CheckpointConfig
    from compiler_core.registry import Registry
    from compiler_core.runtime.session import RankSession


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same activation, produced by node ``producer``."""

    producer: str
    linears: tuple[str, ...]


class Architecture(ABC):
    """A model family: how to recognise its Hugging Face configs, map their weights and build graphs.

    ``config`` arguments of these methods are the family-specific section of the checkpoint config,
    :attr:`compiler_core.formats.checkpoint_config.CheckpointConfig.model`: the dict
    :meth:`config_from_hf` returned, less ``architecture``. The fields the core owns (``dtype``,
    ``mapping``, ``quantization``) are not in it; ``build_graph`` and ``shard_param`` are given the
    dtype and mapping they need as arguments.
    """

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
    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
        """The IR graph of one rank: the global decoder layers ``layers`` (its pipeline stage, as
        :meth:`pipeline_layer_ranges` split them), with per-rank shapes."""

    def check_mapping(self, config: dict[str, Any], mapping: Mapping) -> None:  # noqa: B027
        """Raise ValueError when ``mapping`` cannot split this model (default: any split works)."""

    def num_layers(self, config: dict[str, Any]) -> int:
        """Number of decoder layers (used for pipeline stage ranges)."""
        return int(config["num_hidden_layers"])

    def pipeline_layer_ranges(self, config: dict[str, Any], pp_size: int) -> list[range]:
        """Split the decoder layers into ``pp_size`` contiguous stages, one ``range`` of global layer
        indices each (every layer in exactly one stage). Default: the first ``num_layers % pp_size``
        stages get one extra layer."""
        return default_layer_ranges(self.num_layers(config), pp_size)

    def source_layer(self, source_name: str) -> int | None:
        """The decoder layer a source-checkpoint tensor belongs to, or None for global tensors.

        Lets shard-by-shard conversion skip tensors outside a pipeline stage.
        """
        for part in source_name.split("."):
            if part.isdigit():
                return int(part)
        return None

    def map_weight(self, config: dict[str, Any], name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Translate one source-checkpoint tensor (Hugging Face name, its own dtype) into IR parameters.

        Return a dict of IR parameter name to tensor (several when one source tensor feeds several
        parameters, an empty dict to drop the tensor on purpose), or None for a tensor this family
        does not know, which conversion reports as an error naming it. Default: every tensor is
        unknown, so a family that converts checkpoints overrides this.

        Before any weight is read, conversion calls this with ``meta`` tensors (shape and dtype, no
        data) to check a safetensors checkpoint against its config: use only operations on shapes,
        layouts and dtypes, never the values.
        """
        return None

    def shard_param(
        self, name: str, tensor: torch.Tensor, graph: Graph, config: dict[str, Any], mapping: Mapping, rank: int
    ) -> torch.Tensor:
        """Rank ``rank``'s slice of the full parameter ``tensor`` named ``name``.

        ``graph`` is the rank's graph, whose ``params[name]`` gives the shape the slice must have.
        Override for layouts a plain split cannot express (fused QKV reordered per rank, KV heads
        duplicated when tp_size exceeds them) and call this default for the rest. The default is
        shape-driven: it replicates a parameter whose rank shape equals the full shape, otherwise
        splits the one axis that differs into tp_size chunks. The tail is zero-padded only for a
        parameter the graph declares padded (graph attribute ``padded_params``: a padded
        vocabulary); any other parameter whose chunks overrun its full size raises ValueError
        naming it, since zeros there (K/V heads fewer than tp_size, say) would make a wrong engine
        without a word. ValueError also when no single axis explains the shapes.
        """
        want = graph.params[name].shape
        have = tuple(tensor.shape)
        if want == have:
            return tensor
        differing = [i for i, (w, h) in enumerate(zip(want, have, strict=True)) if w != h]
        if len(want) != len(have) or len(differing) != 1:
            raise ValueError(f"parameter {name}: cannot derive a split of {list(have)} into {list(want)}")
        axis = differing[0]
        chunk = want[axis]
        total = chunk * mapping.tp_size
        if total < have[axis]:
            raise ValueError(
                f"parameter {name}: {mapping.tp_size} chunks of {chunk} cannot hold axis {axis} of {list(have)}"
            )
        if total > have[axis]:
            if not graph.is_padded(name):
                raise ValueError(
                    f"parameter {name}: {mapping.tp_size} chunks of {chunk} overrun axis {axis} of {list(have)} and "
                    "the graph does not declare it padded (graph attribute 'padded_params'); the architecture must "
                    "split it itself (shard_param) or refuse this tp_size (check_mapping)"
                )
            pad = list(have)
            pad[axis] = total - have[axis]
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=axis)
        tp_rank = mapping.tp_rank(rank)
        return tensor.narrow(axis, tp_rank * chunk, chunk).contiguous()

    def scale_groups(self, graph: Graph, config: dict[str, Any]) -> list[ScaleGroup] | None:
        """The linears that read the same activation, for activation-aware schemes (AWQ).

        ``graph`` is a full-precision single-rank graph of this model. Each group names the node
        whose output is the shared input (a norm, an activation or a linear) and the linears that
        read it, so one per-channel scale can be folded into that producer. Default None: the
        core derives the groups from the graph (:mod:`compiler_core.quantize.scale_groups`).
        """
        return None


class QuantScheme(ABC):
    """A post-training quantization format users choose with ``--qformat``."""

    name: str
    #: The ``quant_algo`` value written to a checkpoint's config.json.
    quant_algo: str
    description: str = ""

    def transform_graph(self, graph: Graph, config: CheckpointConfig) -> Graph:
        """Rewrite a rank's full-precision graph into the quantized form ``config`` describes.

        Called for every registered scheme whenever a graph is built from a checkpoint
        config (the whole typed config); return ``graph`` unchanged when ``config.quantization``
        is not this scheme's business.
        """
        return graph

    @abstractmethod
    def quantize(self, model: Any, calibration: Any, options: dict[str, Any]) -> Any:
        """Calibrate and quantize a full-precision single-rank model.

        ``model`` is a :class:`compiler_core.convert.from_hf.LoadedModel`, ``calibration`` a
        :class:`compiler_core.quantize.calibration.CalibrationSet`; return the quantized LoadedModel
        with its ``config.quantization`` filled in. The config is frozen: set ``model.config`` to
        ``dataclasses.replace(model.config, quantization=dataclasses.replace(model.config.quantization, ...))``.
        """

    def quantize_layer(
        self, node: Node, graph: Graph, weights: dict[str, torch.Tensor], stats: dict[str, Any]
    ) -> tuple[list[Node], dict[str, torch.Tensor]] | None:
        """Quantize one node of a full-precision graph (called by
        :func:`compiler_core.quantize.ptq.quantize_layers` for each node it is given stats for).

        ``graph`` is the full-precision single-rank graph holding ``node``; ``weights`` maps its
        parameter names to full-precision tensors; ``stats`` is what calibration recorded for this
        node. Return the replacement nodes and the new parameter tensors (which replace any of the
        node's old ones by name), or None to leave the node as it is (the default).
        """
        return None

    #: ``--kv_cache_dtype`` values this scheme can store KV caches in (empty: none).
    kv_cache_dtypes: tuple[str, ...] = ()

    def quantize_kv_cache(self, model: Any, calibration: Any, options: dict[str, Any]) -> Any:
        """Calibrate and quantize only the KV cache to ``options["kv_cache_dtype"]``.

        Called after the weight scheme (if any) has run, so ``model`` may already be quantized;
        return it with ``config.quantization.kv_cache_quant_algo`` set (by ``dataclasses.replace``).
        Only schemes listing ``kv_cache_dtypes`` implement this.
        """
        raise NotImplementedError(f"quantization format {self.name!r} does not quantize KV caches")


class Backend(ABC):
    """An execution backend: builds per-rank artefacts and loads them for the runtime.

    ``registry`` arguments are the :class:`compiler_core.registry.Registry` of the plugins in use
    (ops, lowerings), passed down from the command or API call that built it.
    """

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
        registry: Registry,
    ) -> dict[str, Any]:
        """Write rank ``rank``'s artefacts into ``out_dir``; return facts to record in config.json."""

    @abstractmethod
    def load_rank(
        self, engine_dir: Path, engine_config: dict[str, Any], rank: int, device: str, registry: Registry
    ) -> RankSession:
        """Load rank ``rank`` of a built engine for execution on ``device``."""

    def describe_rank(self, engine_dir: Path, engine_config: dict[str, Any], rank: int) -> str:
        """Extra lines about rank ``rank``'s artefacts for ``modelc inspect`` (default: none)."""
        return ""
