"""``modelc convert``: Hugging Face checkpoint -> modelc checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from compiler_core.cli.options import OUTPUT_DIR, POSITIVE_INT, option
from compiler_core.convert.from_hf import DTYPE_CHOICES, convert
from compiler_core.errors import UsageError
from compiler_core.host import Host
from compiler_core.mapping import Mapping


@click.command("convert")
@option("--model_dir", required=True, type=click.Path(path_type=Path), help="Hugging Face checkpoint directory.")
@option("--output_dir", required=True, type=OUTPUT_DIR, help="Checkpoint directory to write.")
@option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(DTYPE_CHOICES),
    help="Weight dtype; auto follows the model's torch_dtype (float32 when it names none).",
)
@option("--tp_size", default=1, show_default=True, type=POSITIVE_INT, help="Tensor-parallel ranks.")
@option("--pp_size", default=1, show_default=True, type=POSITIVE_INT, help="Pipeline-parallel stages.")
@option("--world_size", default=None, type=POSITIVE_INT, help="tp_size x pp_size (checked when given).")
@option(
    "--load_by_shard",
    is_flag=True,
    help="Read the source shards one at a time for each rank (peak memory ~ one shard), instead of mapping "
    "the whole model once for all ranks.",
)
@option("--workers", default=1, show_default=True, type=POSITIVE_INT, help="Convert ranks in parallel processes.")
@option("--ammo_quant_ckpt_path", default=None, help="Not supported: use `modelc quantize` (one step).", hidden=True)
@click.pass_obj
def convert_command(
    host: Host,
    model_dir,
    output_dir,
    dtype,
    tp_size,
    pp_size,
    world_size,
    load_by_shard,
    workers,
    ammo_quant_ckpt_path,
):
    """Convert a Hugging Face checkpoint to config.json + rank{r}.safetensors.

    Reads *.safetensors shards (memory-mapped), else *.bin shards with torch.load(weights_only=True):
    a .bin that pickles anything but tensors is refused. Config and tp/pp errors come before any
    weight is read; the output directory appears only when every rank is written.
    """
    if ammo_quant_ckpt_path is not None:
        raise UsageError(
            "--ammo_quant_ckpt_path: the two-step AMMO flow is not supported; quantize in one step with "
            "`modelc quantize --model_dir M --output_dir O --qformat fp8|int4_awq`"
        )
    mapping = Mapping.create(tp_size, pp_size, world_size)
    config = convert(
        Path(model_dir),
        Path(output_dir),
        dtype=dtype,
        mapping=mapping,
        load_by_shard=load_by_shard,
        workers=workers,
        registry=host.registry,
    )
    click.echo(
        f"converted {config.architecture} ({config.dtype}, tp={mapping.tp_size} pp={mapping.pp_size}) to {output_dir}"
    )
