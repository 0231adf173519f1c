"""C kernels built on first use: cached by content, atomic, and an honest None where they cannot be built."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch

from compiler_core.backends.torch import native
from compiler_core.backends.torch.native import load_kernel_library, unavailable_reason

TWICE = "int twice(int x) { return 2 * x; }\n"


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A private source folder and cache; ``load_kernel_library``'s memo is cleared around the test."""
    source_dir = tmp_path / "csrc"
    source_dir.mkdir()
    monkeypatch.setattr(native, "SOURCE_DIR", source_dir)
    monkeypatch.setenv("MODELC_CACHE_DIR", str(tmp_path / "cache"))
    load_kernel_library.cache_clear()
    yield source_dir
    load_kernel_library.cache_clear()


needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None
    or platform.machine() not in ("x86_64", "AMD64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="no C compiler, or a CPU without the kernels' instruction set (x86-64 with AVX2)",
)


@needs_compiler
def test_builds_once_into_the_cache_and_loads(kernels, tmp_path):
    (kernels / "twice.c").write_text(TWICE)
    library = load_kernel_library("twice")
    assert library is not None and library.twice(21) == 42
    (built,) = (tmp_path / "cache" / "kernels").iterdir()
    assert built.name.startswith("twice-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns

    load_kernel_library.cache_clear()  # a new process: the cached library is loaded, not rebuilt
    assert load_kernel_library("twice").twice(5) == 10
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache" / "kernels").iterdir()] == [stamp]

    (kernels / "twice.c").write_text(TWICE.replace("2 * x", "2 * x + 1"))
    load_kernel_library.cache_clear()  # an edited source gets a library of its own
    assert load_kernel_library("twice").twice(5) == 11
    assert len(list((tmp_path / "cache" / "kernels").iterdir())) == 2


@needs_compiler
def test_a_source_that_does_not_compile_leaves_nothing_behind(kernels, tmp_path):
    (kernels / "broken.c").write_text("int broken( {\n")
    assert load_kernel_library("broken") is None
    assert "broken.c" in unavailable_reason("broken")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library


def test_without_a_compiler_the_reason_names_it(kernels, monkeypatch):
    (kernels / "twice.c").write_text(TWICE)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert load_kernel_library("twice") is None
    assert "no-such-compiler-here" in unavailable_reason("twice")


def test_environment_turns_native_kernels_off(kernels, monkeypatch):
    (kernels / "twice.c").write_text(TWICE)
    monkeypatch.setenv("MODELC_NATIVE_KERNELS", "0")
    assert load_kernel_library("twice") is None
    assert unavailable_reason("twice") == "MODELC_NATIVE_KERNELS=0"


def loaded_openmp_files() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}


@needs_compiler
def test_kernels_share_torchs_openmp_runtime(kernels):
    """A kernel's OpenMP is the runtime torch loaded: loading it maps no second one (two pools
    would compete for the same cores)."""
    (kernels / "team.c").write_text(
        "int team(int n) { int size = 0;\n#pragma omp parallel num_threads(n)\n"
        "{\n#pragma omp atomic\nsize++;\n}\nreturn size; }\n"
    )
    before = loaded_openmp_files()
    library = load_kernel_library("team")
    assert library is not None, unavailable_reason("team")
    assert library.team(2) == 2  # really parallel: an OpenMP team of two
    assert loaded_openmp_files() == before
