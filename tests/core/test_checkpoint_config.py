"""The typed checkpoint config: every checkpoint kind round-trips, old files load, bad fields are named.

``data/checkpoint_configs/`` holds config.json files written by modelc before the config was typed
(commit 87faa39): a tiny Falcon-7B converted at tp=2, and quantized at tp=1 with ``--qformat fp8``,
``fp8 --kv_cache_dtype fp8`` and ``int4_awq --group_size 16``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from compiler_core.convert.from_hf import convert
from compiler_core.errors import ModelcError
from compiler_core.formats.checkpoint import (
    check_rank_file,
    rank_file,
    read_config,
    save_rank_weights,
    write_config,
)
from compiler_core.formats.checkpoint_config import CheckpointConfig, QuantConfig
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph

DATA = Path(__file__).parent / "data" / "checkpoint_configs"
KINDS = ("full_tp2", "fp8", "fp8_kv", "int4_awq")


def stored(kind: str) -> dict:
    return json.loads((DATA / f"{kind}.json").read_text())


def typed(kind: str) -> CheckpointConfig:
    return CheckpointConfig.from_json(stored(kind), str(DATA / f"{kind}.json"))


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_round_trips(kind, tmp_path):
    config = typed(kind)
    assert config.to_json() == stored(kind)
    assert list(config.to_json()) == list(stored(kind))  # top-level field order as convert writes it
    write_config(tmp_path, config)
    written = (tmp_path / "config.json").read_text()
    assert json.loads(written) == stored(kind)
    if kind != "int4_awq":
        # Byte for byte. AWQ's section keeps every key and value, but its scheme flags
        # (has_zero_point, pre_quant_scale) now follow the shared fields instead of preceding exclude_modules.
        assert written == (DATA / f"{kind}.json").read_text()


def test_the_typed_fields_of_each_kind():
    full, fp8, fp8_kv, awq = (typed(kind) for kind in KINDS)
    assert (full.architecture, full.dtype, full.mapping) == ("falcon", "float32", Mapping.create(2, 1))
    assert full.quantization == QuantConfig()
    assert full.model["hidden_size"] == 64 and "architecture" not in full.model and "dtype" not in full.model
    assert (fp8.quantization.quant_algo, fp8.quantization.kv_cache_quant_algo) == ("FP8", None)
    assert fp8.quantization.exclude_modules == ("lm_head",) and fp8.quantization.group_size is None
    assert set(fp8.quantization.extras) == {"calibration"}
    assert (fp8_kv.quantization.quant_algo, fp8_kv.quantization.kv_cache_quant_algo) == ("FP8", "FP8")
    q = awq.quantization
    assert (q.quant_algo, q.group_size, q.exclude_modules) == ("W4A16_AWQ", 16, ("lm_head",))
    assert q.extras["pre_quant_scale_modules"] == ["layers.0.mlp.proj", "layers.1.mlp.proj"]
    assert q.extras["scale_groups"]["source"] == "architecture"


@pytest.mark.parametrize("kind", KINDS)
def test_old_configs_build_every_rank_graph(registry, kind):
    config = typed(kind)
    ops = [{n.op for n in rank_graph(registry, config, rank).nodes} for rank in config.mapping.ranks()]
    quantized = {"full_tp2": None, "fp8": "fp8_linear", "fp8_kv": "fp8_linear", "int4_awq": "awq_linear"}[kind]
    assert all((quantized in rank_ops) if quantized else "linear" in rank_ops for rank_ops in ops)


def test_an_old_checkpoint_directory_still_loads(registry, tiny_falcon_7b, tmp_path):
    """The stored tp=2 config.json beside rank files converted now: it reads, and its graphs fit the files."""
    out = tmp_path / "ckpt"
    converted = convert(tiny_falcon_7b, out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    (out / "config.json").write_text((DATA / "full_tp2.json").read_text())
    config = read_config(out)
    assert config == converted
    for rank in config.mapping.ranks():
        check_rank_file(rank_file(out, rank), rank_graph(registry, config, rank).params)


def test_configs_are_frozen_and_changed_by_replace():
    config = typed("full_tp2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "float16"  # type: ignore[misc]
    fp8 = dataclasses.replace(config, quantization=dataclasses.replace(config.quantization, quant_algo="FP8"))
    assert fp8.quantization.quant_algo == "FP8" and config.quantization.quant_algo is None


def test_from_model_fields_needs_the_architecture_name():
    with pytest.raises(ModelcError, match=r"^hf/config\.json: field 'architecture' is missing$"):
        CheckpointConfig.from_model_fields({"hidden_size": 4}, "float32", Mapping(), "hf/config.json")


def _set(path: str, value):
    """A change to a config.json object: set the field at dotted ``path`` (``None`` value deletes it)."""

    def change(data: dict) -> None:
        *parents, last = path.split(".")
        target = data
        for name in parents:
            target = target[name]
        if value is None:
            del target[last]
        else:
            target[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_set("quantization.group_size", 0), "field 'group_size' must be an integer >= 1"),
        (_set("quantization.exclude_modules", "lm_head"), "field 'quantization.exclude_modules' must be a list"),
        (_set("quantization.quant_algo", 8), "field 'quantization.quant_algo' must be a string or null"),
        (_set("quantization", []), "field 'quantization' must be an object"),
        (_set("architecture", 7), "field 'architecture' must be a string"),
        (_set("dtype", "float8"), "field 'dtype' is 'float8'"),
        (_set("format", "modelc-engine"), "field 'format' is 'modelc-engine'"),
        (_set("format_version", None), "field 'format_version' is missing"),
        (_set("mapping.tp_size", "2"), "field 'mapping.tp_size' must be a positive integer"),
    ],
)
def test_a_bad_field_is_one_error_naming_file_and_field(tmp_path, change, fragment):
    data = stored("int4_awq")
    change(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    save_rank_weights(rank_file(tmp_path, 0), {"w": torch.zeros(1)})
    with pytest.raises(ModelcError) as info:
        read_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: "), message
    assert fragment in message


def test_an_engine_config_names_its_checkpoint_field(tmp_path):
    from compiler_core.build.engine import check_engine_config

    checkpoint = stored("fp8")
    checkpoint["quantization"]["group_size"] = -1
    engine = {
        "format": "modelc-engine",
        "format_version": 1,
        "backend": "torch",
        "build": {"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16},
        "checkpoint": checkpoint,
        "graphs": [{}],
    }
    with pytest.raises(ModelcError, match=r"^engine/config\.json: checkpoint: quantization field 'group_size'"):
        check_engine_config(engine, "engine/config.json")
