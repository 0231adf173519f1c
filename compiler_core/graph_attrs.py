"""The graph attributes the runtime reads, filled in or checked by the core when a rank's graph is built.

An architecture's ``build_graph`` need not set them: the core knows the rank, its mapping, the
dtype and the rank's layer range, and takes the model sizes from the checkpoint config. A value
the architecture does set must agree with what the core knows, and a size that neither the graph
nor the config has is one error naming the attribute, raised at convert/build time instead of a
``KeyError`` on every rank of an ``mpirun`` job.

========================  ==========================================================
attribute                 meaning (source when the graph leaves it out)
========================  ==========================================================
``architecture``          the checkpoint's architecture name (config)
``dtype``                 the checkpoint dtype (config)
``rank``                  the rank this graph runs on
``mapping``               ``{world_size, tp_size, pp_size}``
``layers``                ``[start, stop)`` of the rank's decoder layers (``pipeline_layer_ranges``)
``first_stage``           whether the graph reads ``input_ids`` (else ``hidden_states``)
``last_stage``            whether the graph returns logits (else hidden states)
``hidden_size``           width of the hidden states pipeline stages pass on (config)
``vocab_size``            width of the logits (config)
========================  ==========================================================

The stop and padding tokens live in the checkpoint config (``eos_token_id``: one id or a list,
``pad_token_id``: one id or null); they are checked here too, and :func:`stop_token_ids` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Any

from compiler_core.errors import ModelcError, UsageError
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.ir import Graph
from compiler_core.mapping import Mapping

#: Model sizes the runtime needs, taken from the checkpoint config when the graph does not set them.
SIZE_ATTRS = ("hidden_size", "vocab_size")


def complete_graph_attrs(
    graph: Graph, config: CheckpointConfig, mapping: Mapping, rank: int, layers: range, source: str
) -> Graph:
    """``graph`` with every runtime attribute present and consistent with what the core knows.

    Raises ModelcError when the architecture set an attribute to something else, and UsageError
    naming ``source`` when a size is in neither the graph nor the config, or a token id is malformed.
    """
    arch = config.architecture
    attrs = dict(graph.attrs)
    known = {
        "architecture": arch,
        "dtype": config.dtype,
        "rank": rank,
        "mapping": mapping.to_json(),
        "layers": [layers.start, layers.stop],
        "first_stage": mapping.is_first_stage(rank),
        "last_stage": mapping.is_last_stage(rank),
    }
    for key, value in known.items():
        if key in attrs and attrs[key] != value:
            raise ModelcError(
                f"architecture {arch!r}: rank {rank}'s graph sets attribute {key!r} to {attrs[key]!r}, "
                f"but the core knows it is {value!r}"
            )
        attrs[key] = value
    for key in SIZE_ATTRS:
        value = attrs.get(key, config.model.get(key))
        if value is None:
            raise UsageError(
                f"{source}: graph attribute {key!r} is missing: architecture {arch!r} sets it neither in its "
                f"graph nor as field {key!r} of its config"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{source}: graph attribute {key!r} must be a positive integer, got {value!r}")
        attrs[key] = value
    stop_token_ids(config.model, source)
    pad = config.model.get("pad_token_id")
    if pad is not None and not _is_token_id(pad):
        raise UsageError(f"{source}: field 'pad_token_id' must be a token id or null, got {pad!r}")
    return graph.replace(attrs=attrs)


def stop_token_ids(model: MappingABC[str, Any], source: str = "config.json") -> tuple[int, ...]:
    """The ``eos_token_id`` of a checkpoint config's family section (``CheckpointConfig.model``) as a
    tuple (empty when it is absent or null).

    Llama 3 stops on any of three tokens, so a list is kept whole, in order.
    """
    value = model.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list | tuple) else [value]
    if not ids or not all(_is_token_id(i) for i in ids):
        raise UsageError(f"{source}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return tuple(dict.fromkeys(ids))


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
