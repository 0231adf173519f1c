"""`modelc build` and `modelc run` as a user runs them: flags, outputs, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import open_runner, special_ids

#: The build command of TensorRT-LLM's Falcon example, flags and all.
TRTLLM_BUILD_FLAGS = [
    "--remove_input_padding",
    "--use_gpt_attention_plugin",
    "bfloat16",
    "--use_gemm_plugin",
    "bfloat16",
    "--enable_context_fmha",
    "--strongly_typed",
    "--gemm_plugin",
    "auto",
    "--paged_kv_cache",
    "enable",
    "--max_num_tokens",
    "4096",
    "--use-paged-context-fmha",
]


def modelc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compiler_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=300,
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="session")
def checkpoint_tp2(tmp_path_factory, hf_dir) -> Path:
    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping

    out = tmp_path_factory.mktemp("ckpt") / "7b-tp2"
    convert(hf_dir("40b"), out, dtype="float32", mapping=Mapping.create(2, 1), show_progress=False)
    return out


def test_build_accepts_trtllm_flags_and_records_limits(tmp_path, checkpoint_tp2):
    out = tmp_path / "engine"
    result = invoke(
        "build",
        "--checkpoint_dir",
        str(checkpoint_tp2),
        "--output-dir",
        str(out),
        "--max_batch_size",
        "3",
        "--max_input_len",
        "40",
        "--max_seq_len",
        "64",
        *TRTLLM_BUILD_FLAGS,
    )
    assert result.exit_code == 0, result.output
    assert "backend: torch" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["build"] == {"max_batch_size": 3, "max_input_len": 40, "max_seq_len": 64}
    assert config["backend"] == "torch"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "rank0.safetensors",
        "rank1.safetensors",
        "tokenizer",
    ]


def test_build_help_says_what_each_trtllm_flag_does_here():
    text = invoke("build", "--help").output
    for flag in ("--use_gemm_plugin", "--use_gpt_attention_plugin", "--remove_input_padding", "--enable_context_fmha"):
        line = text[text.index(flag) :][:400]
        assert "Ignored" in line or "Accepted" in line, flag


def test_parallel_build_equals_sequential_build(tmp_path, checkpoint_tp2):
    one, two = tmp_path / "w1", tmp_path / "w2"
    for out, workers in ((one, "1"), (two, "2")):
        proc = modelc("build", "--checkpoint_dir", str(checkpoint_tp2), "--output_dir", str(out), "--workers", workers)
        assert proc.returncode == 0, proc.stderr
    assert json.loads((one / "config.json").read_text()) == json.loads((two / "config.json").read_text())
    for rank in (0, 1):
        assert (one / f"rank{rank}.safetensors").read_bytes() == (two / f"rank{rank}.safetensors").read_bytes()


def test_run_output_json_contract(tmp_path, engine_dir, tokenizer):
    engine = engine_dir("rw")
    texts = ["The river ran slowly past the old mill", "Light"]
    out = tmp_path / "out.json"
    proc = modelc(
        "run",
        "--engine_dir",
        str(engine),
        "--input_text",
        texts[0],
        "--input-text",
        texts[1],
        "--max_output_len",
        "10",
        "--num_beams",
        "2",
        "--output_json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    runner, config = open_runner(engine, "cpu")
    end_id, pad_id = special_ids(config)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    expected = generate(runner, prompts, GenerationConfig(10, num_beams=2, end_id=end_id, pad_id=pad_id))
    # One entry per input and beam, in input order, generated tokens only.
    assert result["output_ids"] == [expected[0][0], expected[0][1], expected[1][0], expected[1][1]]
    assert result["output_text"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in result["output_ids"]]
    assert f'Input [Text 1]: "{texts[1]}"' in proc.stdout
    assert proc.stdout.count("Output [Text ") == 4


def test_run_with_input_ids_and_sampling(tmp_path, engine_dir):
    engine = engine_dir("7b")
    outs = []
    for seed in ("5", "5", "6"):
        out = tmp_path / f"out{len(outs)}.json"
        args = ["--input_ids", "1,2,3", "--input_ids", "7, 8", "--max_output_len", "12", "--temperature", "1.5"]
        result = invoke("run", "--engine_dir", str(engine), *args, "--seed", seed, "--output_json", str(out))
        assert result.exit_code == 0, result.output
        outs.append(json.loads(out.read_text()))
    assert len(outs[0]["output_ids"]) == 2
    assert outs[0] == outs[1]
    assert outs[0]["output_ids"] != outs[2]["output_ids"]
    assert all(isinstance(text, str) for text in outs[0]["output_text"])  # the engine's own tokenizer decodes


def test_run_stops_on_any_repeated_end_id(tmp_path, engine_dir):
    engine = engine_dir("7b")
    prompts = ["--input_ids", "1,2,3", "--input_ids", "7, 8"]
    free = tmp_path / "free.json"
    done = invoke("run", "--engine_dir", str(engine), *prompts, "--max_output_len", "12", "--output_json", str(free))
    assert done.exit_code == 0, done.output
    rows = json.loads(free.read_text())["output_ids"]
    stops = [str(rows[0][4]), str(rows[1][6])]  # one token from each row's free run
    out = tmp_path / "out.json"
    ends = ["--end_id", stops[0], "--end_id", stops[1]]
    result = invoke(
        "run", "--engine_dir", str(engine), *prompts, *ends, "--max_output_len", "12", "--output_json", str(out)
    )
    assert result.exit_code == 0, result.output
    runner, _ = open_runner(engine, "cpu")
    end_ids = tuple(int(s) for s in stops)
    expected = generate(runner, [[1, 2, 3], [7, 8]], GenerationConfig(12, end_ids=end_ids, pad_id=end_ids[0]))
    got = json.loads(out.read_text())["output_ids"]
    assert got == [beams[0] for beams in expected]
    assert [len(row) for row in got] == [min(row.index(int(s)) for s in stops if int(s) in row) + 1 for row in rows]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_batch_size", "1"], "2 prompts exceed the engine's max_batch_size 1"),
        (["--max_input_len", "2"], "a prompt of 3 tokens exceeds the engine's max_input_len 2"),
        (["--max_input_len", "3", "--max_seq_len", "8"], "exceed the engine's max_seq_len 8"),
    ],
)
def test_run_enforces_build_limits_with_one_line_exit_2(tmp_path, hf_dir, args, message):
    from compiler_core.convert.from_hf import convert

    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    convert(hf_dir("rw"), ckpt, dtype="float32", show_progress=False)
    assert invoke("build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), *args).exit_code == 0
    result = CliRunner().invoke(
        cli, ["run", "--engine_dir", str(engine), "--input_ids", "1,2,3", "--input_ids", "4", "--max_output_len", "6"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("modelc: error: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input_ids", "1,2", "--input_text", "hi"], "either --input_text or --input_ids"),
        ([], "either --input_text or --input_ids"),
        (["--input_ids", "1,x"], "--input_ids '1,x': expected comma-separated token ids"),
        (["--input_ids", "1,100000"], "token id 100000 is outside the vocabulary"),
        (
            ["--input_text", "hi", "--tokenizer_dir", "/nonexistent"],
            "--tokenizer_dir /nonexistent: directory not found",
        ),
        (["--input_ids", "1", "--num_beams", "0"], "--num_beams must be at least 1"),
        (["--input_ids", "1", "--device", "tpu"], "--device tpu: expected auto, cpu or cuda"),
    ],
)
def test_run_bad_input_is_one_line_exit_2(engine_dir, args, message):
    result = CliRunner().invoke(cli, ["run", "--engine_dir", str(engine_dir("rw")), "--max_output_len", "4", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_run_missing_engine_is_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--engine_dir", str(tmp_path / "nope"), "--input_ids", "1"])
    assert result.exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown on machines without a GPU")
def test_run_on_cuda_without_gpu_says_so(engine_dir):
    result = CliRunner().invoke(
        cli,
        ["run", "--engine_dir", str(engine_dir("rw")), "--input_ids", "1", "--max_output_len", "2", "--device", "cuda"],
    )
    assert result.exit_code == 2
    assert "no CUDA device is available" in result.output


def test_multi_rank_engine_needs_mpirun(engine_dir, monkeypatch):
    from compiler_core.errors import UsageError

    with pytest.raises(UsageError, match=r"world_size 2; run it with `mpirun -n 2 modelc"):
        open_runner(engine_dir("40b", tp=2), "cpu")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="this job has 4 processes"):
        open_runner(engine_dir("40b", tp=2), "cpu")
    with pytest.raises(UsageError, match="engine has world_size 1"):
        open_runner(engine_dir("rw"), "cpu")


def test_default_max_seq_len_follows_max_position_embeddings():
    from compiler_core.build.engine import DEFAULT_SETTINGS, build_settings

    assert build_settings({}, {"max_position_embeddings": 512}) == {
        "max_batch_size": 8,
        "max_input_len": 512,
        "max_seq_len": 512,
    }
    assert build_settings({}, {"max_position_embeddings": 8192})["max_seq_len"] == 8192
    assert build_settings({"max_seq_len": 64}, {"max_position_embeddings": 8192})["max_input_len"] == 64
    assert build_settings({}, {}) == DEFAULT_SETTINGS
