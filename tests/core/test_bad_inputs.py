"""One class of bad input per case, through the CLI as a user runs it: exit code, exactly one stderr
line naming the culprit, no traceback, nothing written.

Most cases run the CLI group in-process (the same group and error handling as the console script,
and much cheaper than a process per case); a representative set per command runs ``python -m
compiler_core`` in a real subprocess, where the last-resort handler and ``main`` are in play too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from compiler_core import hookimpl
from compiler_core.cli import cli
from compiler_core.host import Host
from compiler_core.testing import run_modelc

FALCON_ONLY = {"MODELC_PLUGINS": "falcon"}


def assert_one_error_line(code: int, stderr: str, expected_code: int, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("modelc: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


# --- a model to break ------------------------------------------------------------------------


def _shards(model: Path) -> list[Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return sorted({model / shard for shard in index["weight_map"].values()})


def _shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def rewrite_header(path: Path, change: Callable[[dict], None], data: bytes | None = None) -> None:
    """Rewrite a safetensors file's JSON header through ``change`` (data bytes kept unless given)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + (raw[8 + n :] if data is None else data))


def _read_header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set_config(**fields) -> Callable[[Path], str]:
    def prepare(model: Path) -> str:
        edit_json(model / "config.json", lambda c: c.update(fields))
        return str(model / "config.json")

    return prepare


def _layers(count: int, culprit: Callable[[Path], str]) -> Callable[[Path], str]:
    """num_hidden_layers that disagrees with the layers the shards hold."""

    def prepare(model: Path) -> str:
        edit_json(model / "config.json", lambda c: c.update(num_hidden_layers=count))
        return culprit(model)

    return prepare


def _del_config(field: str) -> Callable[[Path], str]:
    def prepare(model: Path) -> str:
        edit_json(model / "config.json", lambda c: c.pop(field))
        return str(model / "config.json")

    return prepare


def _header(change: Callable[[dict], None]) -> Callable[[Path], str]:
    def prepare(model: Path) -> str:
        shard = max(_shards(model), key=lambda s: len(_read_header(s)))
        rewrite_header(shard, change)
        return str(shard)

    return prepare


def _grow_shape(header: dict) -> None:
    name = _first_tensor(header)
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]


def _overlap(header: dict) -> None:
    """The second tensor (by offset) moved onto the first one's bytes, its own size kept."""
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    begin, end = header[b]["data_offsets"]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + end - begin]


def _entry_as_list(header: dict) -> None:
    name = _first_tensor(header)
    header[name] = [header[name]["dtype"], header[name]["shape"]]


def _bad_dtype(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = "F33"


def _shape_of_strings(header: dict) -> None:
    header[_first_tensor(header)]["shape"] = ["64"]


def _huge_header_length(model: Path) -> str:
    shard = _shards(model)[0]
    raw = bytearray(shard.read_bytes())
    raw[:8] = (1 << 62).to_bytes(8, "little")
    shard.write_bytes(bytes(raw))
    return str(shard)


def _index_entry(value) -> Callable[[Path], str]:
    def prepare(model: Path) -> str:
        index = model / "model.safetensors.index.json"
        edit_json(index, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): value}))
        return str(index)

    return prepare


def _index_names_missing_shard(model: Path) -> str:
    shard = _shards(model)[-1]
    shard.unlink()
    return shard.name


def _index_names_missing_tensor(model: Path) -> str:
    index = model / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].update({"transformer.h.0.extra.weight": _shards(model)[0].name}))
    return "transformer.h.0.extra.weight"


def _symlink_outside(model: Path) -> str:
    shard = _shards(model)[0]
    elsewhere = model.parent / f"elsewhere-{shard.name}"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    return "outside the model directory"


def _fifo_shard(model: Path) -> str:
    """A named pipe in place of a shard: reading it would wait for a writer forever."""
    shard = _shards(model)[0]
    shard.unlink()
    os.mkfifo(shard)
    return str(shard)


def _vocab_mismatch(model: Path) -> str:
    edit_json(model / "config.json", lambda c: c.update(vocab_size=999))
    return "tensor 'transformer.word_embeddings.weight'"


def _retype_tensor(model: Path) -> str:
    """A float tensor stored as int32 (same byte size): a wrong dtype for the weight."""
    shard = _shard_of(model, "transformer.word_embeddings.weight")
    rewrite_header(shard, lambda h: h["transformer.word_embeddings.weight"].update(dtype="I32"))
    return "transformer.word_embeddings.weight"


def _drop_tensor(model: Path) -> str:
    """A shard (and its index) without one of the model's tensors."""
    name = "transformer.ln_f.weight"
    shard = _shard_of(model, name)
    from safetensors.torch import load_file

    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    edit_json(model / "model.safetensors.index.json", lambda i: i["weight_map"].pop(name))
    return "not in the source checkpoint"


# Each case: (id, prepare(model) -> culprit named in the error, expected exit code, other fragments)
CONVERT_CASES = [
    ("no-vocab-size", _del_config("vocab_size"), "'vocab_size' is missing"),
    ("zero-heads", _set_config(num_attention_heads=0), "'num_attention_heads' must be an integer >= 1"),
    ("negative-hidden", _set_config(hidden_size=-64), "'hidden_size' must be an integer >= 1"),
    (
        "fewer-layers",
        _layers(1, lambda m: "tensor 'transformer.h.1."),
        "which no graph parameter of architecture 'falcon' uses",
    ),
    ("more-layers", _layers(3, str), "parameter layers.2."),
    ("list-for-int", _set_config(num_hidden_layers=[2]), "'num_hidden_layers' must be an integer"),
    ("float-for-int", _set_config(num_hidden_layers=2.0), "'num_hidden_layers' must be an integer"),
    ("string-for-bool", _set_config(parallel_attn="yes"), "'parallel_attn' must be true or false"),
    ("rope-no-factor", _set_config(rope_scaling={"type": "linear"}), "'factor' is missing"),
    ("nan-epsilon", _set_config(layer_norm_epsilon=float("nan")), "'layer_norm_epsilon' must be a finite number"),
    ("vocab-vs-embedding", _vocab_mismatch, "implies float32 [999,"),
    ("shape-exceeds-data", _header(_grow_shape), "needs"),
    ("overlapping-offsets", _header(_overlap), "overlaps the tensor before it"),
    ("entry-not-object", _header(_entry_as_list), "header entry must be an object"),
    ("unknown-dtype", _header(_bad_dtype), "dtype 'F33' is not a safetensors dtype"),
    ("shape-of-strings", _header(_shape_of_strings), "is not a list of non-negative integers"),
    ("huge-header-length", _huge_header_length, "header length"),
    ("index-parent-path", _index_entry("../../etc/passwd"), "leads outside the model directory"),
    ("index-absolute-path", _index_entry("/etc/passwd"), "leads outside the model directory"),
    ("index-not-string", _index_entry(7), "must be a shard file name"),
    ("index-missing-shard", _index_names_missing_shard, "is not in"),
    ("index-missing-tensor", _index_names_missing_tensor, "is not in its shard"),
    ("symlink-outside", _symlink_outside, "resolves to"),
    ("fifo-shard", _fifo_shard, "not a regular file"),
    ("wrong-dtype", _retype_tensor, "as int32 [390, 64], but config.json implies float32"),
    ("missing-tensor", _drop_tensor, "parameter ln_f.weight"),
]


@pytest.mark.parametrize("prepare,fragment", [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses_bad_model_inputs(tiny_falcon_7b, tmp_path, prepare, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_falcon_7b, model)
    culprit = prepare(model)
    out = tmp_path / "out"
    code, err = invoke("convert", "--model_dir", model, "--output_dir", out)
    assert_one_error_line(code, err, 2, culprit, fragment)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_convert_follows_a_hugging_face_cache_snapshot(tiny_falcon_7b, tmp_path):
    """snapshots/<rev>/ files are symlinks into ../../blobs/: inside the cache repository, so accepted."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_falcon_7b.iterdir())):
        shutil.copy2(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, err = invoke("convert", "--model_dir", snapshot, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "rank0.safetensors").is_file()


#: prctl option and the capabilities that let root read any file (<linux/prctl.h>, <linux/capability.h>).
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _without_file_override() -> None:
    """In the child before exec: drop the capabilities that make root ignore permission bits, so
    the command sees an unreadable file as any user would."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            os._exit(97)


def test_unreadable_shard_is_one_line(tiny_falcon_7b, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_falcon_7b, model)
    shard = _shards(model)[0]
    shard.chmod(0)
    args = ["convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "out")]
    if os.geteuid() != 0:
        code, err = invoke(*args)
    else:  # root reads any file: run the command without the capabilities that allow it
        done = subprocess.run(
            [sys.executable, "-m", "compiler_core", *args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_without_file_override,
        )
        if done.returncode == 97:
            pytest.skip("this kernel does not let a process drop CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP)")
        code, err = done.returncode, done.stderr
    assert_one_error_line(code, err, 2, str(shard), "cannot be read")
    assert not (tmp_path / "out").exists()


# --- flags -----------------------------------------------------------------------------------

FLAG_CASES = [
    ("convert", ["--tp_size", "0"], "--tp_size must be at least 1, got 0"),
    ("convert", ["--workers", "-2"], "--workers must be at least 1, got -2"),
    ("convert", ["--pp_size", "two"], "--pp_size must be an integer, got 'two'"),
    ("build", ["--max_batch_size", "0"], "--max_batch_size must be at least 1, got 0"),
    ("quantize", ["--group_size", "0"], "--group_size must be at least 1, got 0"),
    ("quantize", ["--calib_size", "-1"], "--calib_size must be at least 1, got -1"),
    ("run", ["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    ("run", ["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    ("run", ["--top_p", "1.5"], "--top_p must be in [0, 1], got 1.5"),
    ("run", ["--pad_id", "-1"], "--pad_id must be at least 0, got -1"),
    ("run", ["--length_penalty", "-inf"], "--length_penalty must be a finite number, got -inf"),
    ("summarize", ["--temperature", "NaN"], "--temperature must be a finite number, got NaN"),
    ("summarize", ["--max_ite", "0"], "--max_ite must be at least 1, got 0"),
    ("verify", ["--tolerance", "nan"], "--tolerance must be a finite number, got nan"),
]

_REQUIRED = {
    "convert": ["--model_dir", "m", "--output_dir", "{tmp}/o"],
    "build": ["--checkpoint_dir", "c", "--output_dir", "{tmp}/o"],
    "quantize": ["--model_dir", "m", "--output_dir", "{tmp}/o"],
    "run": ["--engine_dir", "e", "--input_ids", "1,2", "--max_output_len", "2"],
    "summarize": ["--engine_dir", "e"],
    "verify": ["--model_dir", "m", "--checkpoint_dir", "c"],
}


@pytest.mark.parametrize("command,flags,fragment", FLAG_CASES, ids=[f"{c[0]}{c[1][0]}={c[1][1]}" for c in FLAG_CASES])
def test_out_of_range_flags_are_refused_before_any_work(tmp_path, command, flags, fragment):
    args = [a.format(tmp=tmp_path) for a in _REQUIRED[command]]
    code, err = invoke(command, *args, *flags)
    assert_one_error_line(code, err, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_output_paths_of_the_wrong_kind_are_refused_first(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    code, err = invoke("convert", "--model_dir", "m", "--output_dir", a_file / "sub")
    assert_one_error_line(code, err, 2, f"--output_dir {a_file / 'sub'}", f"{a_file} is a file, not a directory")
    code, err = invoke("build", "--checkpoint_dir", "c", "--output_dir", a_file)
    assert_one_error_line(code, err, 2, f"--output_dir {a_file}: exists and is not a directory")
    code, err = invoke(
        "run", "--engine_dir", "e", "--input_ids", "1", "--max_output_len", "1", "--output_json", tmp_path
    )
    assert_one_error_line(code, err, 2, f"--output_json {tmp_path}: is a directory")
    assert a_file.read_text() == "keep me"


def test_click_usage_errors_are_one_line_too():
    code, err = invoke("convert", "--output_dir", "x")
    assert_one_error_line(code, err, 2, "Missing option '--model_dir'", "convert --help")


# --- checkpoints and engines -----------------------------------------------------------------


@pytest.fixture
def engine_dir(tiny_engine_7b) -> Path:
    return tiny_engine_7b


ENGINE_CASES = [
    ("version-true", lambda c: c.update(format_version=True), "format_version True is not 1"),
    ("build-limit-string", lambda c: c["build"].update(max_batch_size="8"), "'max_batch_size' must be an integer"),
    ("build-not-object", lambda c: c.update(build=[8]), "field 'build' must be an object"),
    ("graphs-short", lambda c: c.update(graphs=[]), "field 'graphs' must be a list of 1 object(s)"),
    ("graph-garbage", lambda c: c["graphs"][0].update(nodes=[1, 2]), "graph of rank 0 is unreadable"),
    ("checkpoint-dtype", lambda c: c["checkpoint"].update(dtype=["float32"]), "field 'dtype' is ['float32']"),
    ("backend-number", lambda c: c.update(backend=3), "field 'backend' must be a string"),
    ("unknown-backend", lambda c: c.update(backend="other"), "unknown backend 'other'"),
    ("another-backend", lambda c: c.update(backend="onnx"), "rank 0 has no ONNX plan"),
]


@pytest.mark.parametrize("change,fragment", [c[1:] for c in ENGINE_CASES], ids=[c[0] for c in ENGINE_CASES])
def test_run_refuses_a_bad_engine_config(engine_dir, tmp_path, change, fragment):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    edit_json(engine / "config.json", change)
    out = tmp_path / "out.json"
    code, err = invoke(
        "run", "--engine_dir", engine, "--input_ids", "1,2", "--max_output_len", "2", "--device", "cpu",
        "--output_json", out,
    )  # fmt: skip
    assert_one_error_line(code, err, 2, "config.json", fragment)
    assert not out.exists()


def _drop_rank_tensor(checkpoint: Path, name: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "rank0.safetensors")
    del tensors[name]
    save_file(tensors, checkpoint / "rank0.safetensors")


def test_run_refuses_an_engine_rank_file_without_a_tensor(engine_dir, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    _drop_rank_tensor(engine, "ln_f.weight")
    code, err = invoke("run", "--engine_dir", engine, "--input_ids", "1,2", "--max_output_len", "2", "--device", "cpu")
    assert_one_error_line(code, err, 2, str(engine / "rank0.safetensors"), "tensor 'ln_f.weight' is missing")


CHECKPOINT_CASES = [
    ("version-true", lambda d: edit_json(d / "config.json", lambda c: c.update(format_version=True)), "format_version"),
    ("arch-number", lambda d: edit_json(d / "config.json", lambda c: c.update(architecture=1)), "'architecture'"),
    ("group-size-zero", lambda d: edit_json(d / "config.json", lambda c: c["quantization"].update(group_size=0)),
     "'group_size' must be an integer >= 1"),
    ("hidden-zero", lambda d: edit_json(d / "config.json", lambda c: c.update(hidden_size=0)), "'hidden_size'"),
    ("heads-word", lambda d: edit_json(d / "config.json", lambda c: c.update(num_attention_heads="four")),
     "not a buildable falcon model"),
    ("missing-tensor", lambda d: _drop_rank_tensor(d, "ln_f.weight"), "tensor 'ln_f.weight' is missing"),
    ("truncated-rank", lambda d: (d / "rank0.safetensors").write_bytes((d / "rank0.safetensors").read_bytes()[:-64]),
     "rank0.safetensors: tensors cover"),
]  # fmt: skip


@pytest.mark.parametrize("change,fragment", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_build_refuses_a_bad_checkpoint(engine_dir, tmp_path, change, fragment):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(engine_dir.with_name(engine_dir.name + "-ckpt"), checkpoint)
    change(checkpoint)
    out = tmp_path / "engine"
    code, err = invoke("build", "--checkpoint_dir", checkpoint, "--output_dir", out, "--backend", "torch")
    assert_one_error_line(code, err, 2, fragment)
    assert not out.exists()


# --- tokenizers and optional packages --------------------------------------------------------


def test_quantize_without_a_tokenizer_names_the_directory_and_the_way_out(tiny_falcon_7b, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_falcon_7b, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    code, err = invoke("quantize", "--model_dir", model, "--output_dir", tmp_path / "out", "--qformat", "fp8",
                       "--calib_size", "1", "--device", "cpu")  # fmt: skip
    line = assert_one_error_line(code, err, 2, f"{model}: no tokenizer", "--tokenizer_dir")
    assert "sentencepiece" not in line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_pyarrow(tmp_path) -> dict[str, str]:
    """An environment in which ``import pyarrow`` fails, as on a machine without it."""
    shim = tmp_path / "shim" / "pyarrow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    return {
        "MODELC_PLUGINS": "falcon,quant_fp8",
        "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")]),
    }


def test_parquet_without_pyarrow_is_one_line_in_a_real_process(engine_dir, tiny_falcon_7b, tmp_path, no_pyarrow):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1")
    done = run_modelc("summarize", "--engine_dir", str(engine_dir), "--dataset", str(data), "--device", "cpu",
                      env=no_pyarrow)  # fmt: skip
    assert_one_error_line(done.returncode, done.stderr, 2, str(data), "needs pyarrow")
    done = run_modelc("quantize", "--model_dir", str(tiny_falcon_7b), "--output_dir", str(tmp_path / "q"),
                      "--qformat", "fp8", "--calib_dataset", str(data), "--device", "cpu", env=no_pyarrow)  # fmt: skip
    assert_one_error_line(done.returncode, done.stderr, 2, str(data), "needs pyarrow")
    assert not (tmp_path / "q").exists()


# --- real processes --------------------------------------------------------------------------


def test_bad_inputs_in_real_processes(tiny_falcon_7b, engine_dir, tmp_path):
    """The console script path: a header mutation, an index escape, a NaN flag and a bad engine field."""
    model = tmp_path / "model"
    shutil.copytree(tiny_falcon_7b, model)
    culprit = _header(_overlap)(model)
    done = run_modelc("convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o"), env=FALCON_ONLY)
    assert_one_error_line(done.returncode, done.stderr, 2, culprit, "overlaps")
    assert not (tmp_path / "o").exists()

    done = run_modelc("run", "--engine_dir", str(engine_dir), "--input_ids", "1", "--max_output_len", "1",
                      "--temperature", "nan", env=FALCON_ONLY)  # fmt: skip
    assert_one_error_line(done.returncode, done.stderr, 2, "--temperature must be a finite number, got nan")

    engine = tmp_path / "engine"
    shutil.copytree(engine_dir, engine)
    edit_json(engine / "config.json", lambda c: c["checkpoint"]["mapping"].update(tp_size=[1]))
    done = run_modelc("run", "--engine_dir", str(engine), "--input_ids", "1", "--max_output_len", "1",
                      "--device", "cpu", env=FALCON_ONLY)  # fmt: skip
    assert_one_error_line(done.returncode, done.stderr, 2, str(engine / "config.json"), "mapping.tp_size")


# --- the last resort -------------------------------------------------------------------------


class _Broken:
    """A plugin whose command fails in a way no validation anticipated."""

    @hookimpl
    def register_commands(self, cli):
        @cli.command("broken")
        def broken():
            {}["no such key"]


def test_an_unexpected_exception_is_one_line_with_the_debug_advice():
    host = Host.load(extra={"broken-plugin": _Broken()})
    result = CliRunner().invoke(cli, ["broken"], obj=host)
    line = assert_one_error_line(result.exit_code, result.stderr, 1, "internal error: KeyError: 'no such key'")
    assert line.endswith("rerun with --debug for the traceback")
    result = CliRunner().invoke(cli, ["--debug", "broken"], obj=host)
    assert isinstance(result.exception, KeyError)  # --debug lets it through, traceback and all
