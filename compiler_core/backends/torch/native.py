"""C kernels shipped as source in ``compiler_core/backends/torch/csrc`` and compiled on first use.

The package stays pure Python: a kernel is built once per machine with the system's C compiler
(``$CC``, else ``cc``) into a cache directory (``$MODELC_CACHE_DIR``, else
``$XDG_CACHE_HOME/modelc``, else ``~/.cache/modelc``), under a name that hashes the source, the
flags and the compiler, and is loaded with ctypes, which releases the GIL for the call. The
library is written under a temporary name and renamed into place, so ranks that build at the
same time never load a half-written file. Without a compiler, on a CPU the flags do not fit, or
with ``MODELC_NATIVE_KERNELS=0``, :func:`load_kernel_library` returns None and callers keep
their torch path; :func:`unavailable_reason` says why.

OpenMP comes from the runtime torch has already loaded (its own ``libgomp``, whatever the wheel
named it): the library is linked against that file, so the kernels and torch share one thread
pool rather than two pools competing for the same cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent / "csrc"
#: x86-64 kernels use AVX2 and FMA; ``torch.backends.cpu.get_cpu_capability()`` vouches for both.
X86_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC")
_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("MODELC_CACHE_DIR"):
        return Path(os.environ["MODELC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modelc"


def unavailable_reason(name: str) -> str | None:
    """Why :func:`load_kernel_library` returned None for ``name`` (None if it did not)."""
    return _reasons.get(name)


@functools.cache
def load_kernel_library(name: str) -> ctypes.CDLL | None:
    """The compiled ``csrc/<name>.c``, built on first use; None where it cannot be built or loaded here."""
    try:
        return _load(name)
    except _Unavailable as exc:
        _reasons[name] = str(exc)
        return None


class _Unavailable(Exception):
    pass


def _load(name: str) -> ctypes.CDLL:
    if os.environ.get("MODELC_NATIVE_KERNELS", "1") == "0":
        raise _Unavailable("MODELC_NATIVE_KERNELS=0")
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or capability not in ("AVX2", "AVX512"):
        raise _Unavailable(f"the kernels need x86-64 with AVX2; this CPU is {platform.machine()} ({capability})")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise _Unavailable(f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH)")
    source = (SOURCE_DIR / f"{name}.c").read_bytes()
    openmp = torch_openmp_library()
    parts = [source, " ".join(X86_FLAGS).encode(), _compiler_version(compiler).encode(), str(openmp).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{name}-{key}.so"
    if not library.exists():
        _compile(compiler, SOURCE_DIR / f"{name}.c", library, openmp)
    try:
        return ctypes.CDLL(str(library))
    except OSError as exc:
        raise _Unavailable(f"cannot load {library}: {exc}") from None


def torch_openmp_library() -> Path | None:
    """The OpenMP runtime file torch has loaded into this process (None if none is found)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {Path(line.split()[-1]) for line in maps if "/lib" in line}
    except OSError:
        return None
    runtimes = sorted(p for p in paths if p.name.startswith(("libgomp", "libiomp")) and ".so" in p.name)
    # Wheels keep it in torch/lib or, when auditwheel bundled it, in torch.libs beside the package.
    torch_dirs = {Path(torch.__file__).parent, Path(torch.__file__).parent.parent / "torch.libs"}
    return next((p for p in runtimes if torch_dirs & set(p.parents)), runtimes[0] if runtimes else None)


@functools.cache
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler


def _compile(compiler: str, source: Path, library: Path, openmp: Path | None) -> None:
    # Linked against torch's OpenMP file itself (not with -fopenmp, which would add the system's
    # libgomp), so the loader resolves the kernels' OpenMP calls to the runtime already in use.
    link = [str(openmp), f"-Wl,-rpath,{openmp.parent}"] if openmp is not None else ["-fopenmp"]
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=library.parent))
    except OSError as exc:
        raise _Unavailable(f"cannot write to {library.parent}: {exc}") from None
    try:
        for command in (
            [compiler, *X86_FLAGS, "-c", str(source), "-o", str(work / "kernel.o")],
            [compiler, "-shared", str(work / "kernel.o"), *link, "-o", str(work / "kernel.so")],
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["no output"])[0]
                raise _Unavailable(f"{compiler} failed on {source.name}: {first}")
        os.replace(work / "kernel.so", library)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"{compiler} failed on {source.name}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
