"""Plugin loading into a host: nothing at import, each host its own, MODELC_PLUGINS, misspelt hooks,
duplicates, broken plugins."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest
from click.testing import CliRunner

from compiler_core import hookimpl, plugins
from compiler_core.cli import cli
from compiler_core.errors import ModelcError
from compiler_core.host import Host
from compiler_core.ir import OpSpec
from compiler_core.plugins import PluginLoadWarning, new_plugin_manager, register_checked
from compiler_core.testing import run_modelc


@dataclass
class FakeEntryPoint:
    """An entry point as importlib.metadata gives it, counting how often it is loaded."""

    name: str
    value: str
    dist: Any = None
    group: str = "compiler_core"
    loads: int = 0

    def load(self) -> Any:
        self.loads += 1
        return importlib.import_module(self.value)


class EntryPoints:
    """Installs fake entry points (modules written to a temp dir) in place of the real ones."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.points: list[FakeEntryPoint] = []

    def add(self, name: str, source: str, *, module: str | None = None, dist: Any = None) -> FakeEntryPoint:
        module = module or f"modelc_test_{name}_{abs(hash(self.tmp_path)) % 10**8}"
        (self.tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        ep = FakeEntryPoint(name, module, dist)
        self.points.append(ep)
        return ep


@pytest.fixture
def fake_eps(monkeypatch, tmp_path):
    eps = EntryPoints(tmp_path)
    monkeypatch.setattr(plugins, "entry_points", lambda: list(eps.points))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.PLUGINS_ENV, raising=False)
    yield eps
    for ep in eps.points:
        sys.modules.pop(ep.value, None)


GOOD = """
    from compiler_core import hookimpl
    from compiler_core.ir import OpSpec

    __version__ = "3.1.4"

    @hookimpl
    def register_ops(register):
        register(OpSpec("{op}", "a test op"))
"""

BROKEN = """
    raise ImportError("this plugin needs libfoo, which is not installed")
"""

MISSPELT = """
    from compiler_core import hookimpl

    @hookimpl
    def register_lowering(register):
        return None
"""

BAD_SIGNATURE = """
    from compiler_core import hookimpl

    @hookimpl
    def register_lowerings(register, device):
        return None
"""


def names(info: list[dict]) -> dict[str, str]:
    return {p["name"]: p["status"] for p in info}


# --- loaded by a host, nothing at import ------------------------------------------------------


def test_plugins_load_when_a_host_is_built_not_at_import():
    """Importing the CLI, the host or the plugin modules loads no plugin; Host.load() does, and two
    hosts are two separate sets of plugins."""
    code = textwrap.dedent(
        """
        import sys
        import compiler_core.cli, compiler_core.host, compiler_core.plugins, compiler_core.registry
        assert "modelc_plugins.falcon" not in sys.modules, "falcon imported at import time"
        host = compiler_core.host.Host.load()
        assert "modelc_plugins.falcon" in sys.modules
        other = compiler_core.host.Host.load()
        assert other.pm is not host.pm and other.registry is not host.registry
        assert host.registry is host.registry
        print("ok")
        """
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_host_loads_each_entry_point_once(fake_eps):
    ep = fake_eps.add("good", GOOD.format(op="good_op"))
    assert ep.loads == 0
    host = Host.load()
    assert host.registry.ops and host.plugin_info()
    assert ep.loads == 1
    assert host.pm.has_plugin("good")
    assert host.registry.provided_by[("ops", "good_op")] == "good"


def test_each_host_loads_the_entry_points_again(fake_eps):
    ep = fake_eps.add("good", GOOD.format(op="good_op"))
    first = Host.load()
    assert Host.load().pm is not first.pm
    assert ep.loads == 2


# --- MODELC_PLUGINS -------------------------------------------------------------------------


def test_env_restricts_which_entry_points_load(fake_eps, monkeypatch):
    wanted = fake_eps.add("wanted", GOOD.format(op="wanted_op"))
    skipped = fake_eps.add("skipped", GOOD.format(op="skipped_op"))
    monkeypatch.setenv(plugins.PLUGINS_ENV, " wanted , ")
    host = Host.load()
    assert names(host.plugin_info()) == {"core": "loaded", "wanted": "loaded"}
    assert skipped.loads == 0, "a filtered plugin must not even be imported"
    assert wanted.loads == 1
    assert "skipped_op" not in host.registry.ops


def test_env_empty_loads_only_the_core(fake_eps, monkeypatch):
    fake_eps.add("wanted", GOOD.format(op="wanted_op"))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "")
    assert names(Host.load().plugin_info()) == {"core": "loaded"}


def test_env_naming_an_unknown_plugin_warns(fake_eps, monkeypatch):
    fake_eps.add("wanted", GOOD.format(op="wanted_op"))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "wanted,wnated")
    with pytest.warns(PluginLoadWarning, match="MODELC_PLUGINS names 'wnated'"):
        Host.load()


def test_env_restricts_modelc_plugins_json_in_a_subprocess():
    done = run_modelc("plugins", "--json", env={plugins.PLUGINS_ENV: "falcon"})
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert [p["name"] for p in info] == ["core", "falcon"]
    assert all(p["status"] == "loaded" for p in info)
    assert done.stderr == ""


# --- misspelt and mis-declared hooks ----------------------------------------------------------


class Misspelt:
    @hookimpl
    def register_lowering(self, register):  # the spec is register_lowerings
        return None


def test_check_pending_catches_a_misspelt_hookimpl():
    pm = new_plugin_manager()
    pm.register(Misspelt(), name="misspelt")
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_lowering'"):
        pm.check_pending()


def test_register_checked_rejects_misspelt_hook_and_leaves_manager_clean():
    pm = new_plugin_manager()
    before = {name for name in vars(pm.hook) if not name.startswith("_")}
    with pytest.raises(pluggy.PluginValidationError, match=r"'register_lowering'.*did you mean 'register_lowerings'"):
        register_checked(pm, Misspelt(), "misspelt")
    assert not pm.has_plugin("misspelt")
    pm.check_pending()  # nothing of the rejected plugin is left behind
    assert {n for n in vars(pm.hook) if not n.startswith("_") and pm.hook.__dict__[n].get_hookimpls()} <= before


def test_misspelt_entry_point_plugin_is_reported_and_others_load(fake_eps):
    fake_eps.add("typo", MISSPELT)
    fake_eps.add("good", GOOD.format(op="good_op"))
    with pytest.warns(PluginLoadWarning, match=r"'typo' failed to load: PluginValidationError: .*'register_lowering'"):
        host = Host.load()
    status = names(host.plugin_info())
    assert status == {"core": "loaded", "good": "loaded", "typo": "failed"}
    assert not host.pm.has_plugin("typo")
    assert [i.plugin_name for i in host.pm.hook.register_lowerings.get_hookimpls()] == ["core"]


def test_hook_with_wrong_signature_is_reported(fake_eps):
    fake_eps.add("sig", BAD_SIGNATURE)
    with pytest.warns(PluginLoadWarning, match=r"'sig' failed to load: PluginValidationError: .*device"):
        host = Host.load()
    failed = [p for p in host.plugin_info() if p["status"] == "failed"]
    assert [p["name"] for p in failed] == ["sig"]


# --- duplicates -----------------------------------------------------------------------------


class OpPlugin:
    def __init__(self, op: str) -> None:
        self.op = op

    @hookimpl
    def register_ops(self, register):
        register(OpSpec(self.op, "test op"))


def test_duplicate_op_names_both_plugins():
    host = Host.load(extra={"first_plugin": OpPlugin("twice"), "second_plugin": OpPlugin("twice")})
    with pytest.raises(ModelcError) as info:
        _ = host.registry
    message = str(info.value)
    assert "op 'twice' is registered twice" in message
    assert "'first_plugin'" in message and "'second_plugin'" in message


def test_duplicate_of_a_core_op_names_core():
    with pytest.raises(ModelcError) as info:
        _ = Host.load(extra={"shadow": OpPlugin("linear")}).registry
    assert "by plugin 'core' and by plugin 'shadow'" in str(info.value)


class CommandPlugin:
    @hookimpl
    def register_commands(self, cli):
        @cli.command("convert")
        def convert() -> None:
            """A second convert."""


def test_duplicate_command_names_both_plugins_and_cli_says_so_in_one_line():
    host = Host.load(extra={"copycat": CommandPlugin()})
    with pytest.raises(
        ModelcError, match="command 'convert' is registered twice: by plugin 'core' and by plugin 'copycat'"
    ):
        _ = host.commands
    result = CliRunner().invoke(cli, ["--help"], obj=host)
    assert isinstance(result.exception, ModelcError)
    assert "convert" in Host.load().commands.commands  # another host does not have the plugin


def test_duplicate_entry_point_name_is_reported(fake_eps):
    fake_eps.add("dup", GOOD.format(op="one_op"), module="modelc_test_dup_a")
    fake_eps.add("dup", GOOD.format(op="two_op"), module="modelc_test_dup_b")
    fake_eps.add("core", GOOD.format(op="three_op"), module="modelc_test_dup_c")
    with pytest.warns(PluginLoadWarning):
        host = Host.load()
    failed = {p["module"]: p["error"] for p in host.plugin_info() if p["status"] == "failed"}
    assert set(failed) == {"modelc_test_dup_b", "modelc_test_dup_c"}
    assert "already taken" in failed["modelc_test_dup_b"]
    assert "already taken by the core" in failed["modelc_test_dup_c"]
    assert "one_op" in host.registry.ops and "two_op" not in host.registry.ops


# --- registration errors name the plugin ------------------------------------------------------


class WrongType:
    @hookimpl
    def register_architectures(self, register):
        register(OpSpec("not_an_arch", "oops"))


class Raises:
    @hookimpl
    def register_backends(self, register):
        raise RuntimeError("backend probe exploded")


def test_registering_the_wrong_type_names_the_plugin():
    with pytest.raises(ModelcError) as info:
        _ = Host.load(extra={"wrongtype": WrongType()}).registry
    assert "plugin 'wrongtype': register_architectures was given OpSpec, not a Architecture" in str(info.value)


def test_a_raising_registration_hook_names_the_plugin():
    with pytest.raises(ModelcError) as info:
        _ = Host.load(extra={"exploder": Raises()}).registry
    assert "plugin 'exploder': register_backends failed: RuntimeError: backend probe exploded" in str(info.value)


# --- a plugin that raises at import ---------------------------------------------------------


def test_plugin_calling_sys_exit_at_import_is_reported(fake_eps):
    fake_eps.add("quitter", "import sys\nsys.exit('quitter: missing CUDA')\n")
    with pytest.warns(PluginLoadWarning, match="'quitter' failed to load: SystemExit: quitter: missing CUDA"):
        host = Host.load()
    assert names(host.plugin_info())["quitter"] == "failed"


def test_broken_plugin_is_reported_by_name_and_the_cli_keeps_working(fake_eps):
    fake_eps.add("broken", BROKEN)
    fake_eps.add("good", GOOD.format(op="good_op"))
    with pytest.warns(PluginLoadWarning, match="modelc plugin 'broken' failed to load: ImportError: .*libfoo"):
        host = Host.load()
    runner = CliRunner()
    help_result = runner.invoke(cli, ["--help"], obj=host)
    assert help_result.exit_code == 0, help_result.output
    for command in ("convert", "plugins", "inspect"):
        assert command in help_result.stdout
    assert runner.invoke(cli, ["convert", "--help"], obj=host).exit_code == 0

    listed = runner.invoke(cli, ["plugins", "--json"], obj=host)
    assert listed.exit_code == 0, listed.output
    by_name = {p["name"]: p for p in json.loads(listed.stdout)}
    assert by_name["broken"]["status"] == "failed"
    assert "ImportError: this plugin needs libfoo" in by_name["broken"]["error"]
    assert by_name["good"]["status"] == "loaded"
    assert by_name["good"]["provides"] == {"ops": ["good_op"]}

    text = runner.invoke(cli, ["plugins"], obj=host)
    assert text.exit_code == 0
    assert "broken (unknown version)  FAILED: ImportError: this plugin needs libfoo" in text.stdout


# --- modelc plugins ----------------------------------------------------------------------------


def test_plugin_info_fields_for_the_installed_plugins(host):
    info = {p["name"]: p for p in host.plugin_info()}
    version = importlib.metadata.version("modelc")
    for name in ("core", "falcon"):
        entry = info[name]
        assert set(entry) >= {"name", "version", "package", "hooks", "provides", "status"}
        assert entry["status"] == "loaded"
        assert entry["version"] == version
        assert entry["package"] == "modelc"
    assert info["falcon"]["provides"]["architectures"] == ["falcon"]
    assert "tiny-falcon" in info["falcon"]["provides"]["commands"]
    assert {"register_architectures", "register_commands"} <= set(info["falcon"]["hooks"])
    core = info["core"]["provides"]
    assert {"convert", "quantize", "build", "run", "summarize", "verify", "inspect", "plugins"} <= set(core["commands"])
    assert "torch" in core["backends"]
    assert {"linear", "attention", "rms_norm"} <= set(core["ops"])


def test_every_plugin_modelc_ships_loads_with_its_version(host):
    """The built-in plugins (falcon, quant_fp8, quant_awq, ...) come in through modelc's own entry points."""
    dist = importlib.metadata.distribution("modelc")
    shipped = {ep.name for ep in dist.entry_points if ep.group == plugins.ENTRY_POINT_GROUP}
    assert {"falcon", "quant_fp8", "quant_awq"} <= shipped
    info = {p["name"]: p for p in host.plugin_info()}
    for name in shipped:
        assert info[name]["status"] == "loaded", info[name].get("error")
        assert (info[name]["version"], info[name]["package"]) == (dist.version, "modelc")
        assert info[name]["provides"], f"{name} registers nothing"


def test_version_comes_from_the_distribution(fake_eps):
    dist = SimpleNamespace(metadata={"Name": "modelc-fancy"}, version="7.0.1")
    fake_eps.add("fancy", GOOD.format(op="fancy_op"), dist=dist)
    entry = next(p for p in Host.load().plugin_info() if p["name"] == "fancy")
    assert (entry["version"], entry["package"]) == ("7.0.1", "modelc-fancy")
    fake_eps.add("nodist", GOOD.format(op="nodist_op"))
    entry = next(p for p in Host.load().plugin_info() if p["name"] == "nodist")
    assert (entry["version"], entry["package"]) == ("3.1.4", None)  # falls back to __version__


def test_plugins_text_lists_each_plugin_version_and_provides(host):
    result = CliRunner().invoke(cli, ["plugins"], obj=host)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for p in host.plugin_info():
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{p['name']} "))
        assert p["version"] in lines[head]
        for kind, provided in p["provides"].items():
            block = lines[head + 1 : head + 1 + len(p["provides"])]
            assert f"    {kind.replace('_', ' ')}: {', '.join(provided)}" in block
    assert any(line.startswith("falcon ") for line in lines)
    assert "    architectures: falcon" in lines


def test_the_cli_works_without_an_optional_backend_package(falcon_checkpoint_tp2, tmp_path):
    """README command 1 installs no onnx: the onnx plugin then registers no lowerings (nothing to
    lower with) instead of failing the whole registry, and asking for its backend says what to install."""
    blocked = "import sys; sys.modules['onnx'] = None; from compiler_core.cli import main; main()"
    listed = subprocess.run(
        [sys.executable, "-c", blocked, "plugins", "--json"], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    onnx = next(p for p in json.loads(listed.stdout) if p["name"] == "onnx")
    assert onnx["status"] == "loaded" and "lowerings" not in onnx["provides"]
    args = ["build", "--checkpoint_dir", str(falcon_checkpoint_tp2), "--output_dir", str(tmp_path / "e")]
    refused = subprocess.run(
        [sys.executable, "-c", blocked, *args, "--backend", "onnx"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr
    assert "onnx" in refused.stderr and "pip install 'modelc[onnx]'" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "e").exists()
