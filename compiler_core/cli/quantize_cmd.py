"""``modelc quantize``: Hugging Face checkpoint -> calibrated, quantized, sharded modelc checkpoint.

The one-step equivalent of TensorRT-LLM's ``examples/quantization/quantize.py``; the formats
come from the loaded quant-scheme plugins (see :mod:`compiler_core.quantize.ptq`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from compiler_core.cli import context_host
from compiler_core.cli.options import NON_NEGATIVE_INT, OUTPUT_DIR, POSITIVE_INT, option
from compiler_core.convert.from_hf import DTYPE_CHOICES
from compiler_core.errors import UsageError
from compiler_core.host import Host
from compiler_core.mapping import Mapping
from compiler_core.quantize.calibration import DEFAULT_CALIB_SIZE, DEFAULT_MAX_SEQ_LENGTH
from compiler_core.quantize.ptq import kv_cache_dtype_choices, qformat_choices, quantize
from compiler_core.registry import Registry


class RegistryChoice(click.ParamType):
    """A choice among names that plugins register, looked up in the command's host only when needed
    (help or parsing)."""

    name = "choice"

    def __init__(self, choices: Callable[[Registry], list[str]], flag: str, what: str) -> None:
        self.choices, self.flag, self.what = choices, flag, what

    def _known(self, ctx: click.Context | None) -> list[str]:
        return self.choices(context_host(ctx or click.get_current_context()).registry)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self._known(ctx)) + "]"

    def convert(self, value, param, ctx):
        known = self._known(ctx)
        if value not in known:
            raise UsageError(f"{self.flag} {value!r}: unknown {self.what} (known: {', '.join(known) or 'none'})")
        return value


def _patterns(values: tuple[str, ...]) -> list[str] | None:
    """--exclude_modules values (repeatable, comma-separated); '' or 'none' means exclude nothing."""
    if not values:
        return None
    patterns = [p.strip() for v in values for p in v.split(",")]
    return [p for p in patterns if p and p.lower() != "none"]


@click.command("quantize")
@option("--model_dir", required=True, type=click.Path(path_type=Path), help="Hugging Face checkpoint directory.")
@option(
    "--output_dir",
    "--export_path",
    "output_dir",
    required=True,
    type=OUTPUT_DIR,
    help="Checkpoint directory to write (--export_path is TensorRT-LLM quantize.py's name for it).",
)
@option(
    "--qformat",
    default="full_prec",
    show_default=True,
    type=RegistryChoice(qformat_choices, "--qformat", "quantization format"),
    help="Quantization format from the loaded plugins; full_prec keeps the weights (use with --kv_cache_dtype).",
)
@option(
    "--kv_cache_dtype",
    default=None,
    type=RegistryChoice(kv_cache_dtype_choices, "--kv_cache_dtype", "KV-cache dtype"),
    help="Also store the KV cache quantized, with a calibrated scale per layer.",
)
@option(
    "--calib_size",
    default=DEFAULT_CALIB_SIZE,
    show_default=True,
    type=POSITIVE_INT,
    help="Calibration samples (blocks).",
)
@option(
    "--calib_dataset",
    default=None,
    type=click.Path(path_type=Path),
    help="Calibration text: .txt (paragraphs), .jsonl or .parquet with a 'text' or 'article' field. "
    "Default: the corpus shipped with modelc.",
)
@option(
    "--calib_max_seq_length",
    default=DEFAULT_MAX_SEQ_LENGTH,
    show_default=True,
    type=POSITIVE_INT,
    help="Tokens per calibration sample.",
)
@option("--batch_size", default=1, show_default=True, type=POSITIVE_INT, help="Calibration samples per forward pass.")
@option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(DTYPE_CHOICES),
    help="Dtype of the unquantized parts; auto follows the model's torch_dtype.",
)
@option("--tp_size", default=1, show_default=True, type=POSITIVE_INT, help="Tensor-parallel ranks of the output.")
@option("--pp_size", default=1, show_default=True, type=POSITIVE_INT, help="Pipeline-parallel stages of the output.")
@option(
    "--exclude_modules",
    multiple=True,
    help="Node-name patterns (fnmatch, repeatable or comma-separated) to leave unquantized; replaces the "
    "format's default (lm_head). '' or none quantizes every layer the format supports.",
)
@option(
    "--group_size",
    "--awq_block_size",
    "group_size",
    default=None,
    type=POSITIVE_INT,
    help="Weights per quantization group of group-wise formats (int4_awq: default 128); --awq_block_size is "
    "TensorRT-LLM quantize.py's name for it.",
)
@option(
    "--tokenizer_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Tokenizer for the calibration text [default: the one in --model_dir].",
)
@option("--seed", default=1234, show_default=True, type=NON_NEGATIVE_INT, help="Random seed for calibration.")
@option(
    "--device",
    default="auto",
    show_default=True,
    help="Where calibration runs: auto (cuda when available), cpu, cuda, cuda:N.",
)
@click.pass_obj
def quantize_command(
    host: Host,
    model_dir,
    output_dir,
    qformat,
    kv_cache_dtype,
    calib_size,
    calib_dataset,
    calib_max_seq_length,
    batch_size,
    dtype,
    tp_size,
    pp_size,
    exclude_modules,
    group_size,
    tokenizer_dir,
    seed,
    device,
):
    """Calibrate and quantize a Hugging Face checkpoint, writing config.json + rank{r}.safetensors.

    Example: modelc quantize --model_dir falcon-7b --output_dir ckpt --qformat fp8 --kv_cache_dtype fp8
    """
    config, calibration = quantize(
        Path(model_dir),
        Path(output_dir),
        qformat=qformat,
        kv_cache_dtype=kv_cache_dtype,
        calib_size=calib_size,
        calib_dataset=calib_dataset,
        calib_max_seq_length=calib_max_seq_length,
        batch_size=batch_size,
        dtype=dtype,
        mapping=Mapping.create(tp_size, pp_size),
        exclude_modules=_patterns(exclude_modules),
        group_size=group_size,
        tokenizer_dir=tokenizer_dir,
        seed=seed,
        device=device,
        registry=host.registry,
    )
    q = config.quantization
    click.echo(
        f"quantized {config.architecture} (quant_algo={q.quant_algo}, "
        f"kv_cache_quant_algo={q.kv_cache_quant_algo}, tp={tp_size} pp={pp_size}) on "
        f"{calibration.num_samples} samples / {calibration.num_tokens} tokens of {calibration.source} "
        f"to {output_dir}"
    )
    used = q.extras.get("scale_groups")
    if used:
        groups = used["groups"]
        how = "named by the architecture" if used["source"] == "architecture" else "derived from the graph"
        shown = "; ".join(f"{p} -> {', '.join(linears)}" for p, linears in list(groups.items())[:3])
        more = (
            f"; ... ({len(groups)} in all, listed in config.json quantization.scale_groups)" if len(groups) > 3 else ""
        )
        click.echo(f"activation-aware scale groups {how}: {shown}{more}")
