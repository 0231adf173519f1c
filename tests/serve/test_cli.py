"""``modelc serve``'s refusals: one ``modelc: error:`` line naming what is wrong, exit 2, no traceback."""

from __future__ import annotations

import socket

import pytest

from compiler_core.testing import error_lines, run_modelc


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    result = run_modelc("serve", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    return line


def test_missing_server_packages_name_the_extra(engine, tmp_path):
    stub = tmp_path / "uvicorn"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('uvicorn is not installed here', name='uvicorn')\n")
    line = refused("--engine_dir", str(engine("7b")), env={"PYTHONPATH": str(tmp_path)})
    assert "uvicorn" in line and "pip install 'modelc[serve]'" in line


def test_limits_past_the_engines_and_a_taken_port(engine):
    engine_dir = str(engine("7b"))
    assert "--max_batch_size 9" in refused("--engine_dir", engine_dir, "--max_batch_size", "9")
    assert "--max_seq_len 65" in refused("--engine_dir", engine_dir, "--max_seq_len", "65")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"--port {port}" in refused("--engine_dir", engine_dir, "--port", str(port))


def test_an_engine_whose_backend_cannot_run_single_rows_is_refused(hf_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from compiler_core.build.engine import build_engine, choose_backend
    from compiler_core.convert.from_hf import convert

    convert(hf_dir("7b"), tmp_path / "ckpt", dtype="float32", show_progress=False)
    backend, _ = choose_backend("onnx")
    build_engine(tmp_path / "ckpt", tmp_path / "onnx", backend, {}, show_progress=False)
    line = refused("--engine_dir", str(tmp_path / "onnx"))
    assert "onnx backend" in line and "--backend torch" in line
