"""The checkpoint format: mapping validation, rank files, reader errors and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from compiler_core import hookimpl
from compiler_core.convert.from_hf import convert
from compiler_core.errors import UsageError
from compiler_core.formats.checkpoint import load_rank_weights, rank_file, read_config, save_rank_weights
from compiler_core.formats.checkpoint_config import FORMAT_VERSION, QuantConfig
from compiler_core.formats.fileio import OutputKind, atomic_output_dir
from compiler_core.host import Host
from compiler_core.mapping import Mapping
from compiler_core.registry import Registry
from modelc_plugins.falcon import Falcon

# --- mapping ---------------------------------------------------------------------------------


def test_mapping_rank_layout():
    m = Mapping.create(tp_size=2, pp_size=3)
    assert m.world_size == 6
    assert [(m.tp_rank(r), m.pp_rank(r)) for r in m.ranks()] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(m.rank(m.tp_rank(r), m.pp_rank(r)) == r for r in m.ranks())
    assert m.tp_group(3) == [2, 3]
    assert m.is_first_stage(1) and not m.is_first_stage(2)
    assert m.is_last_stage(5) and not m.is_last_stage(3)
    assert Mapping.from_json(m.to_json()) == m


def test_world_size_must_equal_tp_times_pp():
    with pytest.raises(UsageError, match=r"world_size 3 != tp_size 2 x pp_size 1"):
        Mapping.create(tp_size=2, pp_size=1, world_size=3)
    with pytest.raises(UsageError, match=r"config\.json: mapping: world_size 4 != tp_size 2 x pp_size 1"):
        Mapping.from_json({"world_size": 4, "tp_size": 2, "pp_size": 1})


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True, None])
def test_mapping_sizes_must_be_positive_integers(bad):
    with pytest.raises(UsageError, match=r"ckpt/config\.json: field 'mapping\.tp_size' must be a positive integer"):
        Mapping.from_json({"world_size": 2, "tp_size": bad, "pp_size": 1}, "ckpt/config.json")


def test_mapping_must_be_an_object_with_every_field():
    with pytest.raises(UsageError, match="field 'mapping' must be an object"):
        Mapping.from_json([2, 2, 1])
    with pytest.raises(UsageError, match=r"field 'mapping\.world_size' is missing"):
        Mapping.from_json({"tp_size": 1, "pp_size": 1})


def test_convert_cli_refuses_inconsistent_world_size(tiny_falcon, tmp_path):
    from click.testing import CliRunner

    from compiler_core.cli import cli

    result = CliRunner().invoke(
        cli, ["convert", "--model_dir", str(tiny_falcon), "--output_dir", str(tmp_path / "o"), "--world_size", "3"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "modelc: error: mapping: world_size 3 != tp_size 1 x pp_size 1"
    assert not (tmp_path / "o").exists()


# --- rank files ------------------------------------------------------------------------------


def test_rank_weights_round_trip_with_tied_tensors(tmp_path):
    embed = torch.randn(6, 4)
    weights = {"embed.weight": embed, "lm_head.weight": embed, "ln.bias": torch.zeros(4, dtype=torch.bfloat16)}
    path = rank_file(tmp_path, 3)
    assert path.name == "rank3.safetensors"
    save_rank_weights(path, weights)
    back = load_rank_weights(path)
    assert set(back) == set(weights)
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor)


def test_unreadable_rank_file_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"rank0\.safetensors: rank weights not found"):
        load_rank_weights(rank_file(tmp_path, 0))
    rank_file(tmp_path, 0).write_bytes(b"not safetensors at all")
    with pytest.raises(UsageError, match=r"rank0\.safetensors: not a safetensors file"):
        load_rank_weights(rank_file(tmp_path, 0))


def _write_checkpoint(directory: Path, layout: Mapping, **overrides) -> dict:
    """A checkpoint whose config.json is the object convert writes, with ``overrides`` applied."""
    directory.mkdir()
    config = {
        "format": "modelc-checkpoint",
        "format_version": 1,
        "architecture": "falcon",
        "dtype": "float16",
        "mapping": layout.to_json(),
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        **overrides,
    }
    (directory / "config.json").write_text(json.dumps(config))
    for r in layout.ranks():
        save_rank_weights(rank_file(directory, r), {"w": torch.zeros(1)})
    return config


def test_config_round_trip(tmp_path):
    fp8 = {"quant_algo": "FP8", "kv_cache_quant_algo": None}
    written = _write_checkpoint(tmp_path / "c", Mapping.create(2, 2), quantization=fp8)
    read = read_config(tmp_path / "c")
    assert read.to_json() == written
    assert read.format_version == FORMAT_VERSION
    assert read.mapping == Mapping.create(2, 2)


def test_every_rank_file_must_be_present(tmp_path):
    _write_checkpoint(tmp_path / "c", Mapping.create(2, 2))
    rank_file(tmp_path / "c", 2).unlink()
    with pytest.raises(UsageError, match=r"/c: rank2\.safetensors is missing \(mapping has world_size 4\)"):
        read_config(tmp_path / "c")


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"format_version": 99}, "format_version 99 is not 1"),
        ({"quantization": "fp8"}, "field 'quantization' must be an object"),
        ({"dtype": "int8"}, "field 'dtype' is 'int8'"),
        ({"mapping": {"world_size": 2, "tp_size": 1, "pp_size": 1}}, "world_size 2 != tp_size 1 x pp_size 1"),
    ],
)
def test_read_config_errors_name_file_and_field(tmp_path, overrides, fragment):
    _write_checkpoint(tmp_path / "c", Mapping(), **overrides)
    with pytest.raises(UsageError) as info:
        read_config(tmp_path / "c")
    assert str(info.value).startswith(f"{tmp_path / 'c' / 'config.json'}: ")
    assert fragment in str(info.value)


def test_read_config_of_missing_dir_or_file(tmp_path):
    with pytest.raises(UsageError, match="checkpoint directory not found"):
        read_config(tmp_path / "absent")
    with pytest.raises(UsageError, match=r"config\.json: checkpoint config not found"):
        read_config(tmp_path)


# --- atomic writes ---------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mode, by relative path."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


class FailOnRank1(Falcon):
    """A Falcon whose shard_param gives up on rank 1, after rank 0 has been sharded (and written)."""

    def __init__(self) -> None:
        self.ranks: list[int] = []

    def shard_param(self, name, tensor, graph, config, mapping, rank):
        self.ranks.append(rank)
        if rank == 1:
            raise RuntimeError("disk full while writing rank 1")
        return super().shard_param(name, tensor, graph, config, mapping, rank)


def only(arch: Falcon) -> Registry:
    """The registry of a host with the core and ``arch`` as its only architecture."""

    class Registers:
        @hookimpl
        def register_architectures(self, register):
            register(arch)

    return Host.with_plugins({"fail_on_rank1": Registers()}).registry


def test_failed_conversion_leaves_existing_output_intact(tiny_falcon, tmp_path):
    out = tmp_path / "out"
    convert(tiny_falcon, out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    before = snapshot(out)
    assert {"config.json", "rank0.safetensors", "rank1.safetensors"} <= set(before)

    failing = FailOnRank1()
    with pytest.raises(RuntimeError, match="disk full"):
        convert(
            tiny_falcon, out, dtype="float16", mapping=Mapping.create(2, 1), show_progress=False, registry=only(failing)
        )
    assert 0 in failing.ranks and 1 in failing.ranks  # it really got midway
    assert snapshot(out) == before
    assert siblings(out) == ["out"], "no temporary directory may be left behind"


def test_failed_first_conversion_leaves_nothing(tiny_falcon, tmp_path):
    registry = only(FailOnRank1())
    with pytest.raises(RuntimeError):
        convert(tiny_falcon, tmp_path / "out", mapping=Mapping.create(2, 1), show_progress=False, registry=registry)
    assert list(tmp_path.iterdir()) == []


def test_successful_conversion_replaces_the_old_output(tiny_falcon, tmp_path):
    out = tmp_path / "out"
    convert(tiny_falcon, out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    (out / "stale.txt").write_text("from an older run")
    convert(tiny_falcon, out, dtype="float16", mapping=Mapping.create(1, 1), show_progress=False)
    assert not (out / "stale.txt").exists()
    assert not rank_file(out, 1).exists()
    assert read_config(out).dtype == "float16"
    assert siblings(out) == ["out"]


KIND = OutputKind("test output", "test-output")


def test_output_directory_gets_normal_permissions(tmp_path):
    with atomic_output_dir(tmp_path / "made", KIND) as tmp:
        (tmp / "config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "made").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_refuses_to_replace_a_directory_that_is_not_a_previous_output(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match=r"home: is not empty and is not an earlier test output; refusing to replace"):
        with atomic_output_dir(home, KIND) as tmp:
            (tmp / "config.json").write_text("{}")
    assert (home / "thesis.tex").read_text() == "precious"
    assert siblings(home) == ["home"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        with atomic_output_dir(tmp_path / "file", KIND):
            pass


def test_empty_existing_directory_is_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty", KIND) as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "empty" / "a").read_text() == "1"


def test_old_output_is_restored_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"format": "test-output", "old": true}')
    before = snapshot(target)
    real_rename = Path.rename

    def rename(self, dest):
        if ".out.tmp-" in self.name:
            raise OSError("rename refused")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_output_dir(target, KIND) as tmp:
            (tmp / "config.json").write_text('{"new": true}')
    assert snapshot(target) == before
    assert siblings(target) == ["out"]


def test_exception_inside_the_block_removes_the_temporary_dir(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "new", KIND) as tmp:
            (tmp / "partial").write_bytes(os.urandom(16))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_removes_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "kept" / "a" / "b" / "out", KIND):
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_converted_checkpoint_is_complete(falcon_checkpoint_tp2, tiny_falcon):
    config = read_config(falcon_checkpoint_tp2)
    hf = json.loads((tiny_falcon / "config.json").read_text())
    assert config.architecture == "falcon"
    assert json.loads((falcon_checkpoint_tp2 / "config.json").read_text())["format"] == "modelc-checkpoint"
    assert config.model["hidden_size"] == hf["hidden_size"]
    assert config.quantization == QuantConfig()
    assert config.quantization.to_json() == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert (falcon_checkpoint_tp2 / "tokenizer" / "tokenizer.json").is_file()
    r0, r1 = (
        load_rank_weights(rank_file(falcon_checkpoint_tp2, 0)),
        load_rank_weights(rank_file(falcon_checkpoint_tp2, 1)),
    )
    assert set(r0) == set(r1)
    assert torch.equal(r0["embed.weight"], r1["embed.weight"])  # replicated
    assert r0["layers.0.mlp.fc.weight"].shape[0] * 2 == hf["ffn_hidden_size"]  # split


def test_loading_tensor_by_tensor_reads_what_was_written(tmp_path):
    """The runtime's one-tensor-at-a-time reader (``each``) gives the same tensors as safetensors'
    own loader, for every dtype modelc writes, an empty tensor included, and maps each one."""
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "f8": torch.randn(2, 3).to(torch.float8_e4m3fn),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "i8": -torch.arange(5, dtype=torch.int8),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "rank0.safetensors"
    save_rank_weights(path, tensors)
    seen = []
    got = load_rank_weights(path, lambda t: seen.append(t.dtype) or t)
    assert sorted(got) == sorted(tensors) and len(seen) == len(tensors)
    for name, expected in tensors.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def test_loading_tensor_by_tensor_names_a_truncated_file(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_rank_weights(path, {"w": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        UsageError, match=r"rank0\.safetensors: tensors cover 16384 bytes of data, but the file holds 16284"
    ):
        load_rank_weights(path, lambda t: t)
