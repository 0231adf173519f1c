"""Third-party plugins, proven in real virtual environments.

Each test makes a fresh venv with pip (:class:`compiler_core.testing.Venv`), installs modelc
into it (editable, from this checkout) and then a plugin package, and runs that venv's own
``modelc`` console script.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from compiler_core.testing import Venv, check_ok, run_clean

REPO_ROOT = Path(__file__).resolve().parents[2]

EXAMPLE = REPO_ROOT / "examples" / "modelc-hello-plugin"


def _plugins_json(venv: Venv) -> dict[str, dict]:
    done = check_ok(venv.modelc("plugins", "--json"))
    return {p["name"]: p for p in json.loads(done.stdout)}


def test_example_plugin_installs_into_a_venv_and_shows_up(tmp_path):
    venv = Venv(tmp_path / "venv", REPO_ROOT)
    source = venv.install_copy(EXAMPLE, tmp_path / "hello-src")
    helped = check_ok(venv.modelc("--help"))
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

    greeted = check_ok(venv.modelc("hello", "--name", "venv", "--scale-factor", "0.5"))
    assert greeted.stdout.splitlines()[-1].startswith("hello_scale([1.0, 2.0, 3.0], factor=0.5) = [0.5, 1.0, 1.5]")

    # The plugin's own tests pass against the installed package.
    tests = run_clean(
        [venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", source / "tests"], source, timeout=180
    )
    check_ok(tests)
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
    venv = Venv(tmp_path / "venv", REPO_ROOT)
    src = tmp_path / "broken-src"
    src.mkdir()
    (src / "pyproject.toml").write_text(textwrap.dedent(BROKEN_PYPROJECT))
    (src / "modelc_broken.py").write_text('raise ImportError("modelc_broken needs libnothing.so")\n')
    venv.pip_install(src)

    warning = "modelc: warning: modelc plugin 'broken' failed to load: ImportError: modelc_broken needs libnothing.so"
    helped = check_ok(venv.modelc("--help"))
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
    only_falcon = check_ok(
        run_clean([venv.bin / "modelc", "plugins", "--json"], tmp_path, env={"MODELC_PLUGINS": "falcon"})
    )
    assert only_falcon.stderr == ""
    assert [p["name"] for p in json.loads(only_falcon.stdout)] == ["core", "falcon"]
