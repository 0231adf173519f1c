"""`modelc convert` behaviour: early tp errors, pipeline stages, vocab padding, dtype auto,
load_by_shard/workers byte identity, .bin checkpoints (weights only), CLI flags."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from compiler_core.cli import cli
from compiler_core.formats.checkpoint import rank_file, read_config
from compiler_core.mapping import Mapping
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.loading import checkpoint_runner


def modelc(*args: str):
    """Run the CLI in-process; result has exit_code, stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result) -> str:
    """The CLI's one error line (progress bars, cleared on a terminal, may precede it)."""
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.startswith("modelc: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def names(ckpt: Path, rank: int) -> set[str]:
    with safe_open(str(rank_file(ckpt, rank)), "pt") as f:
        return set(f.keys())


def rank_bytes(ckpt: Path) -> list[bytes]:
    config = read_config(ckpt)
    return [rank_file(ckpt, r).read_bytes() for r in config.mapping.ranks()]


def test_falcon_is_an_installed_entry_point():
    eps = importlib.metadata.entry_points(group="compiler_core")
    falcon = [ep for ep in eps if ep.name == "falcon"]
    assert len(falcon) == 1 and falcon[0].value == "modelc_plugins.falcon"
    assert falcon[0].load().Falcon.name == "falcon"


# --- tensor parallel: heads that do not split ------------------------------------------------


def test_indivisible_heads_fail_before_any_work(tiny, tmp_path):
    """5 heads (like falcon-7b's 71) at tp2: exit 2, one line with the head count and the valid
    sizes. The model dir has no weight files at all, so reaching them would be another error."""
    from modelc_plugins.falcon.tiny import tiny_config

    model_dir = tmp_path / "five-heads"
    model_dir.mkdir()
    tiny_config("7b", vocab_size=390, num_attention_heads=5, hidden_size=80).to_json_file(model_dir / "config.json")
    out = tmp_path / "out"
    result = modelc("convert", "--model_dir", model_dir, "--output_dir", out, "--tp_size", 2)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # nothing else ran: not even a progress bar
    assert lines[0].startswith("modelc: error:") and "config.json" in lines[0]
    assert "num_attention_heads 5" in lines[0] and "valid tp sizes: 1, 5" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [model_dir]


@pytest.mark.parametrize(
    "fields,tp,valid",
    [
        ({"hidden_size": 4544, "num_attention_heads": 71}, 2, "valid tp sizes: 1"),  # falcon-7b
        (
            {"hidden_size": 8192, "num_attention_heads": 128, "num_kv_heads": 8, "new_decoder_architecture": True},
            3,
            "valid tp sizes: 1, 2, 4, 8, 16, 32, 64, 128",
        ),  # falcon-40b: KV heads duplicated past 8
    ],
    ids=["falcon-7b", "falcon-40b"],
)
def test_real_head_counts_give_their_valid_tp_sizes(fields, tp, valid, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "vocab_size": 65024, **fields}))
    result = modelc("convert", "--model_dir", tmp_path, "--output_dir", tmp_path / "o", "--tp_size", tp)
    assert result.exit_code == 2 and valid in error_line(result)
    assert f"num_attention_heads {fields['num_attention_heads']}" in error_line(result)


def test_five_heads_convert_at_a_valid_tp_size(tiny, converted, batch, reference):
    from compiler_core.evaluate.verify import FP32_ATOL, compare, runner_trace

    model_dir = tiny("7b", name="five-heads", num_attention_heads=5, hidden_size=80)
    ckpt = converted(model_dir, 5, 1)
    report = compare(
        reference(model_dir, "float32", 4), runner_trace(checkpoint_runner(ckpt), batch, 4), batch, "float32"
    )
    assert report.max_diff <= FP32_ATOL and report.agreed == report.total, report.lines()


# --- pipeline stages --------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_uneven_pipeline_split_first_stage_embeds_last_stage_heads(tp, tiny, converted):
    """3 layers over pp2: stage 0 holds layers 0-1 and the embedding, stage 1 layer 2, ln_f, lm_head."""
    ckpt = converted(tiny("rw"), tp, 2)
    for tp_rank in range(tp):
        first, last = names(ckpt, tp_rank), names(ckpt, tp + tp_rank)
        assert "embed.weight" in first and "embed.weight" not in last
        assert {"ln_f.weight", "ln_f.bias", "lm_head.weight"} <= last
        assert not {n for n in first if n.startswith(("ln_f", "lm_head"))}
        assert {n.split(".")[1] for n in first if n.startswith("layers.")} == {"0", "1"}
        assert {n.split(".")[1] for n in last if n.startswith("layers.")} == {"2"}


def test_vocab_is_padded_under_tp(tiny, converted):
    """vocab 390 at tp4: 98 lm_head rows per rank, two zero rows of padding on the last."""
    model_dir = tiny("40b")
    ckpt = converted(model_dir, 4, 1)
    heads = [load_file(str(rank_file(ckpt, r)))["lm_head.weight"] for r in range(4)]
    assert all(h.shape == (98, 64) for h in heads)
    full = torch.cat(heads)
    embed = load_file(str(rank_file(ckpt, 0)))["embed.weight"]
    assert torch.equal(full[:390], embed)  # tied
    assert torch.count_nonzero(full[390:]) == 0


def test_kv_heads_are_duplicated_when_tp_exceeds_them(tiny, converted):
    """7b (one KV head) at tp4: every rank holds its query head plus the same K and V rows."""
    ckpt = converted(tiny("7b"), 4, 1)
    qkv = [load_file(str(rank_file(ckpt, r)))["layers.0.attention.qkv.weight"] for r in range(4)]
    assert all(t.shape == (3 * 16, 64) for t in qkv)
    for t in qkv[1:]:
        assert torch.equal(t[16:], qkv[0][16:])
    assert len({t[:16].sum().item() for t in qkv}) == 4


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source,expected", [("bfloat16", "BF16"), ("float32", "F32"), ("float16", "F16")])
def test_dtype_auto_follows_the_hf_torch_dtype(source, expected, tiny, converted):
    model_dir = tiny("falcon2", dtype=source)
    hf = json.loads((model_dir / "config.json").read_text())
    assert (hf.get("torch_dtype") or hf.get("dtype")) == source
    ckpt = converted(model_dir, 1, 1, "auto")
    assert read_config(ckpt).dtype == source
    with safe_open(str(rank_file(ckpt, 0)), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {expected}


def test_explicit_dtype_casts_once_from_the_source(tiny, converted):
    model_dir = tiny("rw")
    src = load_file(str(rank_file(converted(model_dir, 1, 1), 0)))
    half = load_file(str(rank_file(converted(model_dir, 1, 1, "bfloat16"), 0)))
    assert set(src) == set(half)
    for name, t in half.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, src[name].to(torch.bfloat16))


# --- load_by_shard and workers: same bytes ----------------------------------------------------


@pytest.mark.parametrize("variant", ["rw", "40b"])
def test_load_by_shard_and_workers_write_identical_rank_files(variant, tiny, converted):
    model_dir = tiny(variant)
    assert len(list(model_dir.glob("*.safetensors"))) > 3  # really several shards
    plain = rank_bytes(converted(model_dir, 2, 2))
    assert rank_bytes(converted(model_dir, 2, 2, load_by_shard=True)) == plain
    workers = {"rw": {"workers": 2}, "40b": {"workers": 2, "load_by_shard": True}}[variant]
    assert rank_bytes(converted(model_dir, 2, 2, **workers)) == plain


def test_rank_files_hold_exactly_the_graph_params(registry, tiny, converted):
    from compiler_core.model import rank_graph

    ckpt = converted(tiny("180b"), 2, 2)
    config = read_config(ckpt)
    for rank in range(4):
        graph = rank_graph(registry, config, rank)
        weights = load_file(str(rank_file(ckpt, rank)))
        assert set(weights) == set(graph.params)
        for name, p in graph.params.items():
            assert tuple(weights[name].shape) == p.shape


# --- PyTorch .bin checkpoints -----------------------------------------------------------------


def _bin_copy(model_dir: Path, out: Path, extra: dict | None = None) -> Path:
    """``model_dir`` re-saved as two pytorch_model-*.bin shards (+ tokenizer and config)."""
    out.mkdir()
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    keys = sorted(state)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        shard = {k: state[k].clone() for k in part}
        if i == 1 and extra:
            shard.update(extra)
        torch.save(shard, out / f"pytorch_model-0000{i + 1}-of-00002.bin")
    for f in model_dir.iterdir():
        if not f.name.endswith((".safetensors", ".safetensors.index.json")):
            os.symlink(f, out / f.name)
    return out


def test_bin_checkpoint_converts_like_safetensors(tiny, converted, tmp_path):
    model_dir = tiny("rw")
    bin_dir = _bin_copy(model_dir, tmp_path / "bin")
    assert rank_bytes(converted(bin_dir, 2, 1)) == rank_bytes(converted(model_dir, 2, 1))
    assert rank_bytes(converted(bin_dir, 2, 1, load_by_shard=True)) == rank_bytes(converted(model_dir, 2, 1))


class Payload:
    """Unpickling this runs a shell command: what weights_only=True exists to refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["code", "int"])
def test_bin_with_non_tensor_objects_is_refused(kind, tiny, tmp_path):
    marker = tmp_path / "pwned"
    extra = {"evil": Payload(marker)} if kind == "code" else {"step": 7}
    bin_dir = _bin_copy(tiny("rw"), tmp_path / "bin", extra)
    out = tmp_path / "out"
    result = modelc("convert", "--model_dir", bin_dir, "--output_dir", out)
    assert result.exit_code == 2
    line = error_line(result)
    assert "pytorch_model-00002-of-00002.bin" in line
    if kind == "code":
        assert "refused" in line and "weights_only=True" in line and "system" in line
    else:
        assert "entry 'step' is a int, not a tensor" in line
    assert not marker.exists()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- CLI --------------------------------------------------------------------------------------


def test_cli_convert_both_spellings_progress_and_message(tiny, tmp_path):
    out = tmp_path / "ck"
    result = modelc(
        "convert", "--model-dir", tiny("7b"), "--output_dir", out, "--dtype", "float16", "--tp_size", 2, "--pp-size", 1
    )
    assert result.exit_code == 0, result.stderr
    assert "converted falcon (float16, tp=2 pp=1)" in result.stdout
    assert "convert" in result.stderr  # the progress bar
    config = read_config(out)
    assert config.mapping == Mapping.create(2, 1)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_cli_convert_load_by_shard_and_world_size(tiny, tmp_path, converted):
    out = tmp_path / "ck"
    args = ["--tp_size", 1, "--pp_size", 2, "--world_size", 2, "--load_by_shard", "--workers", 1]
    result = modelc("convert", "--model_dir", tiny("40b"), "--output_dir", out, "--dtype", "float32", *args)
    assert result.exit_code == 0, result.stderr
    assert rank_bytes(out) == rank_bytes(converted(tiny("40b"), 1, 2))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tp_size", 2, "--world_size", 3], "world_size 3"),
        (["--workers", 0], "--workers must be at least 1"),
        (["--pp_size", 4], "pp_size 4 exceeds num_hidden_layers 3"),
        (["--ammo_quant_ckpt_path", "x"], "modelc quantize"),
    ],
)
def test_cli_convert_bad_flags_exit_2(args, message, tiny, tmp_path):
    result = modelc("convert", "--model_dir", tiny("rw"), "--output_dir", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in error_line(result)
    assert not (tmp_path / "o").exists()


def test_converted_runner_logits_cover_the_whole_vocab(tiny, converted, batch):
    """The padded vocabulary never leaks into logits: tp4 gives exactly vocab columns."""
    runner = checkpoint_runner(converted(tiny("40b"), 4, 1))
    runner.allocate(*batch.ids.shape)
    logits = runner.logits(batch.ids, positions_from_mask(batch.mask), batch.mask, 0)
    assert logits.shape[-1] == 390
