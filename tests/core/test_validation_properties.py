"""Property-based tests of the readers of untrusted files: the Hugging Face config, the safetensors
header, the shard index and the engine config. Random and mutated inputs must give a clean
ModelcError or a correct load, never another exception and never a hang (each example has a deadline).

Correct means checked against something independent where there is one: a safetensors header that
modelc accepts must load with the safetensors library to the very same tensors.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from compiler_core.build.engine import engine_graph, read_engine_config
from compiler_core.convert.from_hf import model_config_from_hf
from compiler_core.errors import ModelcError
from compiler_core.formats.hf_index import SAFETENSORS_INDEX, weight_files
from compiler_core.formats.safetensors_io import SafetensorsReader
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph

#: Bounded for CI: each reader gets this many examples, each under a deadline that only a hang reaches.
BOUNDED = settings(
    max_examples=150,
    deadline=timedelta(seconds=10),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DELETE = object()

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _replace(value: Any) -> st.SearchStrategy:
    """A replacement for ``value``: anything JSON, the deletion marker, or a near miss of an integer."""
    near = [st.integers(min_value=value - 2, max_value=value + 2)] if isinstance(value, int) else []
    return st.one_of(json_values, st.just(DELETE), *near)


# --- safetensors headers ---------------------------------------------------------------------


def _valid_file() -> bytes:
    torch.manual_seed(0)
    return safetensors_save(
        {
            "a": torch.randn(3, 4),
            "b": torch.arange(6, dtype=torch.int16).reshape(2, 3),
            "c": torch.randn(5).to(torch.bfloat16),
            "empty": torch.zeros(0, 2),
        },
        metadata={"format": "pt"},
    )


VALID = _valid_file()
VALID_HEADER = json.loads(VALID[8 : 8 + int.from_bytes(VALID[:8], "little")])


@st.composite
def mutated_header_files(draw) -> bytes:
    kind = draw(st.sampled_from(["entry", "field", "offset", "top", "length", "bytes", "truncate"]))
    header = copy.deepcopy(VALID_HEADER)
    data = VALID[8 + int.from_bytes(VALID[:8], "little") :]
    if kind in ("entry", "field", "offset"):
        name = draw(st.sampled_from(sorted(header)))
        entry = header[name]
        if kind == "entry":
            header[name] = draw(json_values)
        elif kind == "offset" and isinstance(entry, dict) and "data_offsets" in entry:
            i = draw(st.integers(0, 1))
            entry["data_offsets"][i] += draw(st.integers(-9, 9))
        else:
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "format"]))
            old = entry.get(key, 0) if isinstance(entry, dict) else 0
            value = draw(_replace(old if not isinstance(old, list) else len(old)))
            if isinstance(entry, dict):
                if value is DELETE:
                    entry.pop(key, None)
                else:
                    entry[key] = value
    elif kind == "top":
        header[draw(st.text(max_size=4))] = draw(json_values)
    blob = json.dumps(header).encode()
    length = len(blob)
    if kind == "length":
        length = draw(st.one_of(st.integers(0, len(blob) + 16), st.integers(0, 2**64 - 1)))
    raw = bytearray(length.to_bytes(8, "little") + blob + data)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return bytes(raw)


def _read_with_modelc(path: Path) -> dict[str, torch.Tensor]:
    source = SafetensorsReader(path)
    try:
        return {name: source.tensor(name).clone() for name in source.names()}
    finally:
        source.close()


@BOUNDED
@given(raw=mutated_header_files())
def test_a_mutated_safetensors_header_is_refused_cleanly_or_read_as_safetensors_reads_it(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        try:
            ours = _read_with_modelc(path)
        except ModelcError:
            return
    try:
        theirs = safetensors_load(raw)
    except SafetensorError as exc:
        pytest.fail(f"modelc accepted a file that safetensors refuses ({exc})")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape, name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), theirs[name].reshape(-1).view(torch.uint8)), name


def test_the_unmutated_file_reads_as_saved():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(VALID)
        ours = _read_with_modelc(path)
    assert sorted(ours) == ["a", "b", "c", "empty"]
    assert torch.equal(ours["b"], torch.arange(6, dtype=torch.int16).reshape(2, 3))


# --- Hugging Face configs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def falcon_config() -> dict[str, Any]:
    from modelc_plugins.falcon.tiny import tiny_config

    return json.loads(tiny_config("40b", vocab_size=64, num_layers=2).to_json_string())


@BOUNDED
@given(data=st.data())
def test_a_mutated_hf_config_is_refused_cleanly_or_gives_a_buildable_model(registry, falcon_config, data):
    config = copy.deepcopy(falcon_config)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.one_of(st.sampled_from(sorted(config)), st.text(max_size=6)))
        value = data.draw(_replace(config.get(key, 0)))
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            fields = model_config_from_hf(registry, Path(tmp), "auto", Mapping())
            graph = rank_graph(registry, fields, 0)
        except ModelcError:
            return
    model = fields.model
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_kv_heads"):
        assert isinstance(model[key], int) and not isinstance(model[key], bool) and model[key] >= 1, key
    assert model["num_attention_heads"] * model["head_dim"] == model["hidden_size"]
    assert math.isfinite(model["layer_norm_epsilon"]) and model["layer_norm_epsilon"] > 0
    assert graph.params and all(d >= 1 for p in graph.params.values() for d in p.shape)


# --- shard indexes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sharded")
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, directory / "one.safetensors")
    save_file({"c": torch.zeros(1)}, directory / "two.safetensors")
    (directory.parent / "outside.safetensors").write_bytes((directory / "two.safetensors").read_bytes())
    return directory


INDEX = {
    "metadata": {"total_size": 24},
    "weight_map": {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"},
}
SHARD_NAMES = st.sampled_from(
    ["one.safetensors", "two.safetensors", "three.safetensors", "../outside.safetensors", "/etc/passwd",
     "./one.safetensors", "sub/../one.safetensors", "", ".", "..", "one.safetensors/"]
)  # fmt: skip


@BOUNDED
@given(data=st.data())
def test_a_mutated_index_is_refused_cleanly_or_names_only_real_tensors_inside_the_dir(sharded_dir, data):
    index = copy.deepcopy(INDEX)
    kind = data.draw(st.sampled_from(["shard", "tensor", "map", "top"]))
    if kind == "shard":
        index["weight_map"][data.draw(st.sampled_from(sorted(index["weight_map"])))] = data.draw(
            st.one_of(SHARD_NAMES, json_values)
        )
    elif kind == "tensor":
        index["weight_map"][data.draw(st.text(max_size=3))] = data.draw(SHARD_NAMES)
    elif kind == "map":
        index["weight_map"] = data.draw(json_values)
    else:
        index = data.draw(json_values)
    (sharded_dir / SAFETENSORS_INDEX).write_text(json.dumps(index))
    try:
        files = weight_files(sharded_dir)
    except ModelcError:
        return
    root = sharded_dir.resolve()
    assert files and all(f.resolve().is_relative_to(root) for f in files)
    for name, shard in index["weight_map"].items():
        assert (sharded_dir / shard).resolve() in {f.resolve() for f in files}, name
        assert name in _tensor_names(sharded_dir / shard), name


def _tensor_names(path: Path) -> set[str]:
    raw = path.read_bytes()
    return set(json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])) - {"__metadata__"}


# --- engine configs --------------------------------------------------------------------------


def _paths(value: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every key path into a JSON document, down to ``depth`` (graph nodes are sampled, not all listed)."""
    out = [prefix] if prefix else []
    if depth == 0:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key), depth - 1)
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            out += _paths(item, (*prefix, i), depth - 1)
    return out


@pytest.fixture(scope="module")
def engine_config_text(tiny_engine_7b) -> str:
    return (tiny_engine_7b / "config.json").read_text()


@BOUNDED
@given(data=st.data())
def test_a_mutated_engine_config_is_refused_cleanly_or_reads_every_rank(registry, engine_config_text, data):
    config = json.loads(engine_config_text)
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(_paths(config)))
        parent = config
        try:
            for key in path[:-1]:
                parent = parent[key]
            old = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
        value = data.draw(_replace(old if not isinstance(old, (list, dict)) else 0))
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            loaded = read_engine_config(Path(tmp))
            world = loaded["checkpoint"]["mapping"]["world_size"]
            graphs = [engine_graph(registry, loaded, rank) for rank in range(world)]
        except ModelcError:
            return
    assert len(graphs) == world == len(loaded["graphs"])
    assert all(
        isinstance(loaded["build"][k], int) and loaded["build"][k] >= 1 for k in ("max_batch_size", "max_seq_len")
    )
