"""Helpers for testing the INT4-AWQ plugin: tiny-model settings, Falcons with salient channels,
hand-dequantized transformers references and the CLI run in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.formats.checkpoint import load_rank_weights, rank_file, read_config
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.loading import checkpoint_runner
from modelc_plugins.falcon.convert import ir_name
from modelc_plugins.quant_awq.int4 import dequantize_packed, fake_quantize

GROUP_SIZE = 16
#: Calibration: 8 blocks of 64 tokens of the shipped corpus (its beginning).
CALIB = {"calib_size": 8, "calib_max_seq_length": 64}
OUTLIER_CHANNELS = (3, 17, 40)
OUTLIER_FACTOR = 8.0


def add_outlier_channels(src: Path, dst: Path, tokenizer) -> Path:
    """Copy a Hugging Face Falcon with ``OUTLIER_CHANNELS`` of each decoder layer norm scaled up."""
    from transformers import FalconForCausalLM

    model = FalconForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) and ".h." in f".{name}":
                module.weight[list(OUTLIER_CHANNELS)] *= OUTLIER_FACTOR
    model.save_pretrained(dst, max_shard_size="64KB")
    tokenizer.save_pretrained(dst)
    return dst


def modelc_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    runner = checkpoint_runner(checkpoint)
    runner.allocate(ids.shape[0], ids.shape[1])
    mask = torch.ones_like(ids)
    return runner.logits(ids, positions_from_mask(mask), mask, 0)


def hf_model(hf: Path):
    from transformers import FalconForCausalLM

    return FalconForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def planar_to_grouped(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The checkpoint's [Q | K | V] rows back to Hugging Face's per-KV-group order."""
    g = heads // kv_heads
    rest = t.shape[1:]
    q = t[: heads * head_dim].reshape(kv_heads, g, head_dim, *rest)
    k = t[heads * head_dim : (heads + kv_heads) * head_dim].reshape(kv_heads, 1, head_dim, *rest)
    v = t[(heads + kv_heads) * head_dim :].reshape(kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def dequantized_hf(hf: Path, checkpoint: Path):
    """transformers' Falcon holding the checkpoint's weights dequantized by hand: each int4 weight
    times its group scales, times its prequant scale along the input dim (x * p @ W.T == x @ (W * p).T),
    and the checkpoint's (AWQ-folded) layer norms."""
    config = read_config(checkpoint)
    weights = load_rank_weights(rank_file(checkpoint, 0))
    model = hf_model(hf)
    state = {}
    for name in model.state_dict():
        ir = ir_name(name)
        base = ir.removesuffix(".weight")
        if ir.endswith(".weight") and f"{base}.weights_scaling_factor" in weights:
            scales = weights[f"{base}.weights_scaling_factor"]
            dense = dequantize_packed(weights[ir], scales, config.quantization.group_size, torch.float32)
            prequant = weights.get(f"{base}.prequant_scaling_factor")
            if prequant is not None:
                dense = dense * prequant
        else:
            dense = weights[ir]
        if ".attention.qkv." in ir:
            model_fields = config.model
            heads = (model_fields["num_attention_heads"], model_fields["num_kv_heads"], model_fields["head_dim"])
            dense = planar_to_grouped(dense, *heads)
        state[name] = dense
    model.load_state_dict(state)
    return model


def rtn_hf(hf: Path):
    """transformers' Falcon with plain round-to-nearest INT4 weights (no AWQ scales, no clipping)."""
    model = hf_model(hf)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, GROUP_SIZE))
    return model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| over the spread of the reference logits around each position's mean."""
    return ((out - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()).item()


def run_modelc(*args: str) -> tuple[int, str]:
    """The CLI in-process (same group and error handling as the console script): exit code, stderr."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def refused_quantize(model_dir: Path, out: Path, *flags: str) -> str:
    """``modelc quantize --qformat int4_awq`` that must stop before calibrating: exit 2, nothing
    written, one error line (returned)."""
    code, stderr = run_modelc(
        "quantize", "--model_dir", str(model_dir), "--output_dir", str(out), "--qformat", "int4_awq", *flags
    )
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("modelc: error:")]
    assert len(lines) == 1, stderr
    assert "calibrate" not in stderr
    assert not out.exists()
    return lines[0]
