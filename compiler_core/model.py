"""From a checkpoint config to the IR graph of each rank."""

from __future__ import annotations

from compiler_core.errors import ConfigError, UsageError
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.graph_attrs import complete_graph_attrs
from compiler_core.ir import Graph, validate
from compiler_core.registry import Registry
from compiler_core.rope import check_rope


def rank_graph(registry: Registry, config: CheckpointConfig, rank: int, source: str = "config.json") -> Graph:
    """Build and validate rank ``rank``'s graph, quantized as ``config.quantization`` says.

    The architecture sees only the family section (``config.model``); every quantization scheme's
    ``transform_graph`` sees the whole typed config. The runtime attributes
    (:mod:`compiler_core.graph_attrs`) are filled in or checked, and the rotary settings checked
    against what the kernels implement (:mod:`compiler_core.rope`), before any quantization scheme
    rewrites the graph.
    """
    arch = registry.architecture(config.architecture, source)
    mapping = config.mapping
    try:
        arch.check_mapping(config.model, mapping)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    except (TypeError, KeyError, ZeroDivisionError) as exc:
        raise _not_buildable(source, arch.name, exc) from None
    # The config is input (a hand-edited checkpoint or engine config reaches here): fields of the wrong
    # type or range surface inside the plugin's graph builder, and are reported as the config's fault.
    try:
        stages = arch.pipeline_layer_ranges(config.model, mapping.pp_size)
        layers = stages[mapping.pp_rank(rank)]
        graph = arch.build_graph(config.model, mapping, rank, config.dtype, layers)
        graph = complete_graph_attrs(graph, config, mapping, rank, layers, source)
        check_rope(graph, source)
        for scheme in registry.quant_schemes.values():
            graph = scheme.transform_graph(graph, config)
        return validate(graph, registry.ops)
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise _not_buildable(source, arch.name, exc) from None


def _not_buildable(source: str, architecture: str, exc: Exception) -> ConfigError:
    detail = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return ConfigError(f"{source}: not a buildable {architecture} model ({detail})")
