"""``modelc quantize`` from the command line: FP8 runs, flag spellings, one-line exit-2 errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from compiler_core.cli import cli

SMALL = ["--calib_size", "4", "--calib-max-seq-length", "32"]


def modelc(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_fp8_from_the_command_line_with_a_jsonl_dataset(hf_dir, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text(
        "\n".join(json.dumps({"article": f"Article {i}: the river rose after the rain."}) for i in range(40))
    )
    out = tmp_path / "ckpt"
    result = modelc(
        "quantize",
        "--model-dir",
        str(hf_dir("7b")),
        "--export_path",
        str(out),
        "--qformat",
        "fp8",
        "--kv-cache-dtype",
        "fp8",
        "--calib_dataset",
        str(data),
        "--tp_size",
        "2",
        "--device",
        "cpu",
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    assert "quant_algo=FP8, kv_cache_quant_algo=FP8, tp=2 pp=1" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["calibration"]["dataset"] == str(data)
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_help_lists_the_registered_formats():
    result = modelc("quantize", "--help")
    assert result.exit_code == 0
    assert "fp8" in result.output and "full_prec" in result.output and "--export_path" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qformat", "fp4"], "--qformat 'fp4': unknown quantization format (known: "),
        (["--kv_cache_dtype", "int8"], "--kv_cache_dtype 'int8': unknown KV-cache dtype (known: fp8)"),
        ([], "--qformat full_prec without --kv_cache_dtype quantizes nothing"),
        (["--qformat", "fp8", "--calib_size", "0"], "--calib_size must be at least 1, got 0"),
        (["--qformat", "fp8", "--calib_dataset", "/nonexistent/calib.txt"], "calibration dataset not found"),
        (["--qformat", "fp8", "--tp_size", "3"], "tp_size 3"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hf_dir, tmp_path, args, message):
    result = CliRunner().invoke(
        cli, ["quantize", "--model_dir", str(hf_dir("7b")), "--output_dir", str(tmp_path / "o"), *SMALL, *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_qformat_lists_every_known_one(registry, hf_dir, tmp_path):
    from compiler_core.quantize.ptq import qformat_choices

    result = modelc("quantize", "--model_dir", str(hf_dir("7b")), "--output_dir", str(tmp_path / "o"), "--qformat", "x")
    assert result.exit_code == 2
    assert f"(known: {', '.join(qformat_choices(registry))})" in result.output
    assert "fp8" in qformat_choices(registry) and "full_prec" in qformat_choices(registry)


def test_dataset_without_a_text_field(hf_dir, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"title": "no body"}\n')
    result = modelc(
        "quantize", "--model_dir", str(hf_dir("7b")), "--output_dir", str(tmp_path / "o"), "--qformat", "fp8",
        "--calib_dataset", str(data),
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"{data}:1: record has no 'text' or 'article' field" in result.output


def test_kv_cache_alone_needs_no_qformat(hf_dir, tmp_path):
    """--qformat defaults to full_prec, so --kv_cache_dtype fp8 alone quantizes only the cache."""
    out = tmp_path / "kv"
    result = modelc(
        "quantize", "--model_dir", str(hf_dir("rw")), "--output_dir", str(out), "--kv_cache_dtype", "fp8", *SMALL
    )
    assert result.exit_code == 0, result.output
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == (None, "FP8")
