"""Third-party plugins, proven in real virtual environments.

Each test makes a fresh venv with pip, installs modelc into it (editable, from this checkout)
and then a plugin package, and runs that venv's own ``modelc`` console script. The venv sees
this environment's packages (torch, click, ...) through ``--system-site-packages``; when the
running Python is itself a venv, whose "system" site is the base interpreter's, a ``.pth`` file
points the new venv at this environment's site-packages instead. Nothing is downloaded
(``--no-deps --no-build-isolation --no-index``) unless the environment has no
setuptools to build with (Python >= 3.12 venvs), when pip may fetch it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

EXAMPLE = REPO_ROOT / "examples" / "modelc-hello-plugin"
NEEDED = ("torch", "click", "pluggy", "safetensors", "pip", "pytest")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODELC_PLUGINS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(
    args: list[str | Path], cwd: Path, timeout: int = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**_clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


class Venv:
    """A virtual environment with modelc installed from this checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        _check(_run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root], root.parent))
        probe = f"import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in {NEEDED!r}))"
        if _run([self.python, "-c", probe], root.parent).returncode != 0:
            # The running Python is a venv: the new venv's system site is the base interpreter's,
            # which lacks torch & co. Point it at this environment's site-packages.
            purelib = _check(
                _run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root.parent)
            ).stdout.strip()
            parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
            (Path(purelib) / "_modelc_test_parent_env.pth").write_text("\n".join(parents) + "\n")
            _check(_run([self.python, "-c", probe], root.parent))
        # Build with the setuptools already here when there is one (Python <= 3.11 venvs carry it);
        # otherwise let pip fetch the build backend from the package index.
        has_setuptools = _run([self.python, "-c", "import setuptools"], root.parent).returncode == 0
        self.pip_options = ["--no-build-isolation", "--no-index"] if has_setuptools else []
        self.pip_install("-e", REPO_ROOT)

    def pip_install(self, *args: str | Path) -> None:
        command = [self.python, "-m", "pip", "install", "-q", "--no-deps", *self.pip_options, *args]
        _check(_run(command, self.root))

    def modelc(self, *args: str) -> subprocess.CompletedProcess:
        return _run([self.bin / "modelc", *args], self.root)


def _plugins_json(venv: Venv) -> dict[str, dict]:
    done = _check(venv.modelc("plugins", "--json"))
    return {p["name"]: p for p in json.loads(done.stdout)}


def test_example_plugin_installs_into_a_venv_and_shows_up(tmp_path):
    venv = Venv(tmp_path / "venv")
    # Build from a copy so the checkout gets no build/ or *.egg-info from pip.
    source = shutil.copytree(
        EXAMPLE, tmp_path / "hello-src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    venv.pip_install(source)
    helped = _check(venv.modelc("--help"))
    assert "hello " in helped.stdout and "convert " in helped.stdout
    assert helped.stderr == ""

    info = _plugins_json(venv)
    hello = info["hello"]
    assert hello["status"] == "loaded"
    assert hello["version"] == "0.3.0"
    assert hello["package"] == "modelc-hello-plugin"
    assert hello["provides"] == {"commands": ["hello"], "lowerings": ["torch:hello_scale"], "ops": ["hello_scale"]}
    assert {"register_ops", "register_lowerings", "register_commands"} <= set(hello["hooks"])
    assert info["falcon"]["status"] == "loaded"

    greeted = _check(venv.modelc("hello", "--name", "venv", "--scale-factor", "0.5"))
    assert greeted.stdout.splitlines()[-1].startswith("hello_scale([1.0, 2.0, 3.0], factor=0.5) = [0.5, 1.0, 1.5]")

    # The plugin's own tests pass against the installed package.
    tests = _run([venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", source / "tests"], source, timeout=180)
    _check(tests)
    assert "6 passed" in tests.stdout


BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "modelc-broken-plugin"
version = "0.0.7"

[project.entry-points.compiler_core]
broken = "modelc_broken"

[tool.setuptools]
py-modules = ["modelc_broken"]
"""


def test_plugin_raising_at_import_leaves_the_cli_working(tmp_path):
    venv = Venv(tmp_path / "venv")
    src = tmp_path / "broken-src"
    src.mkdir()
    (src / "pyproject.toml").write_text(textwrap.dedent(BROKEN_PYPROJECT))
    (src / "modelc_broken.py").write_text('raise ImportError("modelc_broken needs libnothing.so")\n')
    venv.pip_install(src)

    warning = "modelc: warning: modelc plugin 'broken' failed to load: ImportError: modelc_broken needs libnothing.so"
    helped = _check(venv.modelc("--help"))
    for command in ("convert", "quantize", "build", "run", "summarize", "verify", "inspect", "plugins", "tiny-falcon"):
        assert f"  {command} " in helped.stdout
    assert helped.stderr.strip().splitlines() == [warning]

    listed = venv.modelc("plugins", "--json")
    assert listed.returncode == 0
    info = {p["name"]: p for p in json.loads(listed.stdout)}
    assert info["broken"]["status"] == "failed"
    assert info["broken"]["version"] == "0.0.7"
    assert info["broken"]["package"] == "modelc-broken-plugin"
    assert info["broken"]["error"] == "ImportError: modelc_broken needs libnothing.so"
    assert info["falcon"]["status"] == "loaded"

    # Other commands still do their work, including failing properly on bad input.
    missing = tmp_path / "missing"
    bad = venv.modelc("inspect", str(missing))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [warning, f"modelc: error: {missing}: directory not found"]
    # Leaving it out with MODELC_PLUGINS silences it: it is not even imported.
    only_falcon = _check(_run([venv.bin / "modelc", "plugins", "--json"], tmp_path, env={"MODELC_PLUGINS": "falcon"}))
    assert only_falcon.stderr == ""
    assert [p["name"] for p in json.loads(only_falcon.stdout)] == ["core", "falcon"]
