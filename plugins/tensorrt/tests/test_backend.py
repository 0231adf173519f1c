"""When tensorrt is usable, when it is the default, and what happens where it is not."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from compiler_core.build.engine import choose_backend, load_rank_session
from compiler_core.cli import cli
from compiler_core.errors import UsageError
from modelc_plugins.tensorrt import backend as trt_backend
from modelc_plugins.tensorrt.package import INSTALL_HINT, gpu_reason, import_tensorrt
from modelc_plugins.tensorrt.testing import build_checkpoint, require_tensorrt


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: None)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU of a chosen compute capability is present."""

    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"GPU sm{capability[0]}{capability[1]}")

    return install


def test_without_a_package_build_says_what_to_install(no_tensorrt, falcons, tmp_path):
    with pytest.raises(UsageError, match="pip install tensorrt-rtx") as info:
        choose_backend("tensorrt")
    assert info.value.exit_code == 2
    args = ["build", "--checkpoint_dir", str(falcons.checkpoint("rw")), "--output_dir", str(tmp_path / "e")]
    result = CliRunner().invoke(cli, [*args, "--backend", "tensorrt"])
    assert result.exit_code == 2
    assert result.output.strip() == f"modelc: error: --backend tensorrt: {INSTALL_HINT}"
    assert not (tmp_path / "e").exists()


def test_without_a_package_tensorrt_is_not_the_default(no_tensorrt):
    backend, reason = choose_backend(None)
    assert backend.name == "torch"
    assert f"tensorrt ({INSTALL_HINT})" in reason


@pytest.mark.parametrize(
    ("capability", "default"), [((8, 6), True), ((8, 9), True), ((12, 0), True), ((8, 0), True), ((9, 0), False)]
)
def test_default_only_with_a_gpu_that_runs_the_engines(fake_gpu, capability, default):
    trt = require_tensorrt()
    fake_gpu(capability)
    backend, reason = choose_backend(None)
    rtx = trt.__name__ == "tensorrt_rtx"
    if default or not rtx:  # datacenter TensorRT runs on Hopper too
        assert backend.name == "tensorrt"
        assert f"imports and GPU sm{capability[0]}{capability[1]}" in reason
    else:
        assert backend.name == "torch"
        assert "TensorRT-RTX engines run on compute capability 8.0, 8.6, 8.9 and 12.x GPUs, not on" in reason


def test_no_gpu_here_means_torch_is_the_default(registry, monkeypatch):
    trt = require_tensorrt()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_reason(trt) == "no CUDA GPU is visible"
    assert registry.backend("tensorrt", "test").preference() < 0
    assert choose_backend(None, registry)[0].name == "torch"


def test_engines_do_not_run_on_the_cpu(registry, falcons, tmp_path):
    require_tensorrt()
    build_checkpoint(falcons.checkpoint("7b", "float16", layers=1), tmp_path / "engine")
    with pytest.raises(UsageError, match="tensorrt engines run on a CUDA GPU, not on 'cpu'"):
        load_rank_session(registry, tmp_path / "engine", 0, "cpu")


def test_package_is_found():
    require_tensorrt()
    assert import_tensorrt().__name__ in ("tensorrt", "tensorrt_rtx")
