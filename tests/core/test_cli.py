"""The ``modelc`` CLI contract: commands, both flag spellings, one-line errors with exit 2, --debug."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.host import Host
from compiler_core.testing import run_modelc

CORE_COMMANDS = ("convert", "quantize", "build", "run", "summarize", "verify", "inspect", "plugins")
#: Only the plugin that the bad-input tests need, so a half-finished plugin elsewhere in the tree
#: cannot add its own warning line to stderr.
FALCON_ONLY = {"MODELC_PLUGINS": "falcon"}


def listed_commands(help_text: str) -> list[str]:
    lines = help_text.split("Commands:", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and line.strip()]


def test_python_m_compiler_core_help_lists_every_core_command():
    done = run_modelc("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: modelc ")
    listed = listed_commands(done.stdout)
    for name in CORE_COMMANDS:
        assert name in listed
    assert "tiny-falcon" in listed  # a plugin's command arrives through the same hook


@pytest.mark.parametrize("name", CORE_COMMANDS)
def test_each_core_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: cli {name}") or result.stdout.startswith(f"Usage: modelc {name}")
    help_line = Host.load().commands.commands[name].get_short_help_str(limit=200)
    assert help_line, f"{name} has no help text"


def _all_commands() -> list[tuple[str, click.Command]]:
    out = []

    def walk(prefix: str, command: click.Command) -> None:
        out.append((prefix, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(f"{prefix} {name}", sub)

    for name, command in Host.load().commands.commands.items():
        walk(name, command)
    return out


def test_every_multiword_flag_of_every_command_accepts_both_spellings():
    checked = 0
    for name, command in _all_commands():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            flags = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
            for flag in flags:
                body = flag[2:]
                for other in {body.replace("_", "-"), body.replace("-", "_")} - {body}:
                    assert f"--{other}" in flags, f"modelc {name}: {flag} has no --{other} spelling"
                    checked += 1
    assert checked > 20


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_convert_accepts_both_spellings(tiny_falcon, tmp_path, spelling):
    sep = "_" if spelling == "underscore" else "-"
    out = tmp_path / "out"
    args = ["convert", f"--model{sep}dir", str(tiny_falcon), f"--output{sep}dir", str(out), f"--tp{sep}size", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "converted falcon (float32, tp=2 pp=1)" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


# --- bad input: exit 2, exactly one line naming the file/field, no traceback ------------------


def assert_one_line_error(code: int, stderr: str, *fragments: str, expected_code: int = 2) -> str:
    assert code == expected_code, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("modelc: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def invoke(*args: str):
    """Run the CLI in-process (the same group and error handling as the console script)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def test_missing_model_dir_is_one_line_exit_2_in_a_real_process(tmp_path):
    missing = tmp_path / "no-such-model"
    done = run_modelc("convert", "--model_dir", str(missing), "--output_dir", str(tmp_path / "o"), env=FALCON_ONLY)
    assert_one_line_error(done.returncode, done.stderr, str(missing), "not found")
    assert not (tmp_path / "o").exists()


def test_bad_json_config_is_one_line_exit_2(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "falcon",,}')
    code, err = invoke("convert", "--model-dir", str(model), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(model / "config.json"), "not valid JSON")


def test_hf_config_with_a_bad_field_names_file_and_field(tiny_falcon, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_falcon, model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 66  # not a multiple of 4 heads
    (model / "config.json").write_text(json.dumps(config))
    code, err = invoke("convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(model / "config.json"), "hidden_size 66")


def test_unknown_model_type_names_file_and_field(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mamba"}')
    code, err = invoke("convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, str(model / "config.json"), "model_type 'mamba'")


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("dtype", None, "field 'dtype' is missing"),
        ("mapping", None, "field 'mapping' is missing"),
        ("dtype", "float64", "field 'dtype' is 'float64'"),
        ("mapping", {"world_size": 2, "tp_size": 2}, "field 'mapping.pp_size' is missing"),
        (
            "mapping",
            {"world_size": 2, "tp_size": "2", "pp_size": 1},
            "field 'mapping.tp_size' must be a positive integer",
        ),
        ("format", "other-tool", "field 'format' is 'other-tool'"),
    ],
)
def test_checkpoint_config_errors_name_file_and_field(falcon_checkpoint_tp2, tmp_path, field, value, fragment):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(falcon_checkpoint_tp2, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    code, err = invoke("inspect", str(ckpt))
    assert_one_line_error(code, err, str(ckpt / "config.json"), fragment)


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "nothing"
    done = run_modelc("--debug", "inspect", str(missing), env=FALCON_ONLY)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "UsageError" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"modelc: error: {missing}: directory not found"


def test_click_usage_errors_exit_2():
    result = CliRunner().invoke(cli, ["convert", "--output_dir", "x"])
    assert result.exit_code == 2
    assert "Missing option '--model_dir'" in result.stderr
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_unsupported_two_step_flow_names_the_one_step_command(tmp_path):
    result = CliRunner().invoke(
        cli, ["convert", "--model_dir", "m", "--output_dir", str(tmp_path / "o"), "--ammo_quant_ckpt_path", "q"]
    )
    assert result.exit_code == 2
    assert "modelc quantize" in result.stderr


def test_version_option():
    import importlib.metadata

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert importlib.metadata.version("modelc") in result.stdout


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_prints_each_rank_graph(falcon_checkpoint_tp2):
    result = CliRunner().invoke(cli, ["inspect", str(falcon_checkpoint_tp2), "--nodes", "5"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith(f"checkpoint {falcon_checkpoint_tp2}")
    assert "architecture: falcon  dtype: float32  mapping: tp=2 pp=1 world=2" in text
    assert "graph falcon.rank0:" in text and "graph falcon.rank1:" in text
    assert "all_reduce×" in text
    assert text.count("more nodes") == 2
    full = CliRunner().invoke(cli, ["inspect", str(falcon_checkpoint_tp2), "--nodes", "-1"])
    assert "more nodes" not in full.stdout
    assert "# lm_head.all_gather" in full.stdout


def test_inspect_of_a_plain_directory_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"modelc: error: {tmp_path}: no config.json (not a modelc checkpoint or engine)"


def test_core_commands_come_through_the_commands_hook():
    """The core's subcommands are registered by the plugin named 'core', like any plugin's."""
    owners = Host.load().commands.provided_by
    for name in CORE_COMMANDS:
        assert owners[("commands", name)] == "core"
    assert owners[("commands", "tiny-falcon")] == "falcon"
    assert not cli.commands, "no command may be attached to the group outside the hook"


def test_placeholder_free_or_explicit(tmp_path: Path):
    """A command owned by a later issue may exist only if it says what is not built; never a silent no-op."""
    commands = Host.load().commands.commands
    for name in CORE_COMMANDS:
        command = commands[name]
        doc = (command.help or "").lower()
        if "not built" in doc:
            result = CliRunner().invoke(cli, [name])
            assert result.exit_code != 0
