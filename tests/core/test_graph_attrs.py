"""The runtime's graph attributes are the core's to fill in or check, not an unwritten contract."""

from __future__ import annotations

from typing import Any

import pytest

from compiler_core import hookimpl
from compiler_core.api import Architecture
from compiler_core.errors import ModelcError, UsageError
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.host import Host
from compiler_core.ir import Graph, GraphBuilder
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph

ARCH = "bare"


class Bare(Architecture):
    """Embedding, one linear per layer, a head: a graph that sets only the attributes it is told to."""

    name = ARCH

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs

    def detect(self, hf_config: dict[str, Any]) -> bool:
        return False

    def config_from_hf(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        return dict(hf_config)

    def build_graph(self, config: dict[str, Any], mapping: Mapping, rank: int, dtype: str, layers: range) -> Graph:
        g = GraphBuilder(f"bare.rank{rank}")
        x = "input_ids" if mapping.is_first_stage(rank) else "hidden_states"
        inputs = [x]
        if mapping.is_first_stage(rank):
            x = g.add("embedding", [x], name="embed", params={"weight": g.param("embed.weight", [10, 4], dtype)})
        for i in layers:
            x = g.add("linear", [x], name=f"l{i}", params={"weight": g.param(f"l{i}.weight", [4, 4], dtype)})
        if mapping.is_last_stage(rank):
            x = g.add("linear", [x], name="head", params={"weight": g.param("head.weight", [10, 4], dtype)})
        return g.build(inputs, [x], attrs=self.attrs)


class BarePlugin:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs

    @hookimpl
    def register_architectures(self, register):
        register(Bare(self.attrs))


def bare_registry(attrs: dict[str, Any]):
    """A registry of the core plus a Bare architecture whose graphs set ``attrs``."""
    return Host.with_plugins({"bare": BarePlugin(attrs)}).registry


def config_json(**fields: Any) -> dict[str, Any]:
    """A Bare checkpoint's config.json object, with ``fields`` set."""
    base = {
        "format_version": 1,
        "architecture": ARCH,
        "num_hidden_layers": 3,
        "hidden_size": 4,
        "vocab_size": 10,
        "eos_token_id": [7, 9],
        "dtype": "float32",
        "mapping": Mapping.create(1, 2).to_json(),
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    return {**base, **fields}


def config(**fields: Any) -> CheckpointConfig:
    return CheckpointConfig.from_json(config_json(**fields), "config.json")


def test_the_core_fills_in_what_the_runtime_reads():
    attrs = rank_graph(bare_registry({}), config(), 1).attrs
    assert attrs == {
        "architecture": ARCH,
        "dtype": "float32",
        "rank": 1,
        "mapping": {"world_size": 2, "tp_size": 1, "pp_size": 2},
        "layers": [2, 3],
        "first_stage": False,
        "last_stage": True,
        "hidden_size": 4,
        "vocab_size": 10,
    }


def test_a_size_in_neither_graph_nor_config_is_one_error_naming_it():
    fields = config_json()
    del fields["hidden_size"]
    registry = bare_registry({})
    with pytest.raises(UsageError, match=r"^ckpt/config\.json: graph attribute 'hidden_size' is missing"):
        rank_graph(registry, CheckpointConfig.from_json(fields, "ckpt/config.json"), 0, "ckpt/config.json")
    assert rank_graph(registry, config(hidden_size=4), 0).attrs["hidden_size"] == 4


def test_an_attribute_that_contradicts_the_core_is_an_error_naming_it():
    with pytest.raises(ModelcError, match=r"rank 1's graph sets attribute 'layers' to \[0, 3\].* is \[2, 3\]"):
        rank_graph(bare_registry({"layers": [0, 3]}), config(), 1)


@pytest.mark.parametrize(("field", "value"), [("eos_token_id", [7, "x"]), ("pad_token_id", -1)])
def test_malformed_token_ids_name_the_field(field, value):
    with pytest.raises(UsageError, match=rf"field '{field}' must be a token id"):
        rank_graph(bare_registry({}), config(**{field: value}), 0)
