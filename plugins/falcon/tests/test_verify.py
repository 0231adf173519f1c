"""`modelc verify`: passes a good conversion, fails a broken one, and its input choices."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compiler_core.evaluate.verify as verify_module
from compiler_core.cli import cli
from compiler_core.evaluate.verify import Batch, Trace, compare, default_tolerance, runner_trace
from compiler_core.formats.checkpoint import rank_file
from compiler_core.runtime.loading import checkpoint_runner


def modelc(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def broken_copy(ckpt: Path, out: Path) -> Path:
    """``ckpt`` with two query heads of layer 0 swapped in rank 0: the kind of layout bug a
    wrong QKV reorder makes (every tensor keeps its name, shape and dtype)."""
    shutil.copytree(ckpt, out)
    path = rank_file(out, 0)
    weights = load_file(str(path))
    qkv = weights["layers.0.attention.qkv.weight"]
    hd = 16
    qkv[:hd], qkv[hd : 2 * hd] = qkv[hd : 2 * hd].clone(), qkv[:hd].clone()
    save_file(weights, str(path), metadata={"format": "pt"})
    return out


def test_cli_verify_passes_a_good_conversion(tiny, converted):
    model_dir = tiny("rw")
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", converted(model_dir, 2, 2))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "(falcon, float32, tp=2 pp=2)" in out
    lengths = re.search(r"2 prompts \(prompts, lengths (\d+), (\d+)\), 32 greedy steps", out).groups()
    assert lengths[0] != lengths[1]  # left padding is exercised
    diff = float(re.search(r"max abs logit difference: (\S+)", out).group(1))
    assert 0 < diff <= 1e-4
    assert "greedy agreement: 64/64 tokens (100.0%)" in out
    assert out.strip().endswith("PASS")


def test_cli_verify_fails_a_broken_conversion(tiny, converted, tmp_path):
    model_dir = tiny("40b")
    bad = broken_copy(converted(model_dir, 2, 1), tmp_path / "bad")
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", bad, "--steps", 4)
    assert result.exit_code == 1
    assert result.stdout.strip().endswith("FAIL")
    diff = float(re.search(r"max abs logit difference: (\S+)", result.stdout).group(1))
    assert diff > 0.1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("modelc: error: verify failed: max abs logit difference")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_tolerance_still_catches_a_layout_bug(dtype, tiny, converted, batch, reference, tmp_path):
    model_dir = tiny("40b")
    bad = broken_copy(converted(model_dir, 2, 2, dtype), tmp_path / "bad")
    report = compare(reference(model_dir, dtype, 8), runner_trace(checkpoint_runner(bad), batch, 8), batch, dtype)
    assert not report.passed and report.max_diff > 2 * report.tolerance, report.lines()


def test_cli_verify_input_ids_and_prompts(tiny, converted):
    model_dir = tiny("7b")
    ckpt = converted(model_dir, 1, 2)
    result = modelc(
        "verify", "--model_dir", model_dir, "--checkpoint_dir", ckpt, "--input_ids", "5,6,7,8", "--input_ids", "9, 10"
    )
    assert result.exit_code == 0, result.output
    assert "(--input_ids, lengths 4, 2), 32 greedy steps" in result.stdout
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", ckpt, "--prompts", "The sea", "--steps", 3)
    assert result.exit_code == 0, result.output
    assert re.search(r"1 prompts \(prompts, lengths \d+\), 3 greedy steps", result.stdout)
    assert "greedy agreement: 3/3" in result.stdout
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", ckpt, "--input_ids", "1,99999")
    assert result.exit_code == 2 and "token 99999 is outside the vocabulary" in result.stderr


def _without_tokenizer(model_dir: Path, out: Path) -> Path:
    out.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            os.link(f, out / f.name)  # a shard symlinked out of its model dir is refused
    return out


def test_tokenizer_from_the_checkpoint_else_fixed_ids(tiny, converted, tmp_path):
    model_dir = tiny("falcon2")
    ckpt = converted(model_dir, 2, 1)
    bare = _without_tokenizer(model_dir, tmp_path / "bare")
    vocab_size = 390
    from_ckpt = verify_module.make_batch(bare, ckpt, vocab_size)
    assert from_ckpt.source == "prompts"
    assert torch.equal(from_ckpt.ids, verify_module.make_batch(model_dir, tmp_path, vocab_size).ids)
    fixed = verify_module.make_batch(bare, tmp_path, vocab_size)
    assert fixed.source == "fixed ids" and fixed.lengths == [11, 6]
    assert int(fixed.ids.max()) < 390
    with pytest.raises(Exception, match="no tokenizer to encode --prompts"):
        verify_module.make_batch(bare, tmp_path, vocab_size, prompts=["hi"])
    shutil.copytree(ckpt, tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "tokenizer")
    result = modelc("verify", "--model_dir", bare, "--checkpoint_dir", tmp_path / "ck", "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "(fixed ids, lengths 11, 6)" in result.stdout


def test_verify_refuses_what_it_cannot_compare(tiny, converted, tmp_path):
    model_dir = tiny("rw")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            os.link(f, legacy / f.name)
    hf = json.loads((model_dir / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**hf, "model_type": "RefinedWebModel"}))
    ckpt = converted(model_dir, 1, 1)
    result = modelc("verify", "--model_dir", legacy, "--checkpoint_dir", ckpt)
    assert result.exit_code == 2 and "transformers cannot load this config without remote code" in result.stderr
    quant = tmp_path / "quant"
    shutil.copytree(ckpt, quant)
    config = json.loads((quant / "config.json").read_text())
    config["quantization"]["quant_algo"] = "FP8"
    (quant / "config.json").write_text(json.dumps(config))
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", quant)
    assert result.exit_code == 2 and "quantized checkpoint (quant_algo FP8)" in result.stderr
    result = modelc("verify", "--model_dir", model_dir, "--checkpoint_dir", ckpt, "--steps", 0)
    assert result.exit_code == 2 and "--steps must be at least 1" in result.stderr


def _trace(step_logits: torch.Tensor) -> Trace:
    return Trace(step_logits[:, :1].clone(), step_logits.argmax(-1), step_logits)


def test_compare_accepts_near_ties_and_flags_real_divergence():
    batch = Batch(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), 0, "test")
    ref = torch.zeros(1, 3, 5)
    ref[0, :, 1] = 5.0
    ref[0, 1, 2] = 5.0 - 1e-5  # step 1: tokens 1 and 2 tie within fp32 noise
    got = ref.clone()
    got[0, 1, 2] = 5.0 + 1e-5  # ... so choosing 2 is not a failure
    report = compare(_trace(ref), _trace(got), batch, "float32")
    assert report.first_divergence == [1] and report.agreed == 1 and report.passed
    got = ref.clone()
    got[0, 1, 3] = 9.0  # a token the reference ranks 5 below its choice
    report = compare(_trace(ref), _trace(got), batch, "float32")
    assert not report.passed and report.bad_divergences[0][:4] == (0, 1, 1, 3)
    assert any("more than a tie" in line for line in report.lines())


def test_default_tolerances():
    assert default_tolerance("float32", 50.0) == 1e-4
    assert default_tolerance("float16", 10.0) == pytest.approx(0.2)
    assert default_tolerance("bfloat16", 0.5) == pytest.approx(0.08)


def test_verify_core_names_no_model_family():
    """compiler_core.evaluate.verify compares through transformers' auto classes and the checkpoint's own
    architecture plugin: it imports no plugin."""
    tree = ast.parse(Path(verify_module.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("plugins")]
    assert "trust_remote_code" not in Path(verify_module.__file__).read_text()
