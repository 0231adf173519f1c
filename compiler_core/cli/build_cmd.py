"""``modelc build``: checkpoint -> engine directory (the ``trtllm-build`` step)."""

from __future__ import annotations

from pathlib import Path

import click

from compiler_core.build.engine import DEFAULT_SETTINGS, build_engine, choose_backend, engine_checkpoint
from compiler_core.cli.options import OUTPUT_DIR, POSITIVE_INT, accepted_flag, option
from compiler_core.errors import UsageError
from compiler_core.host import Host

#: trtllm-build flags that choose TensorRT-LLM plugins or kernels. Each is accepted (bare, as in
#: older releases, or with a value, as in newer ones) so a copied command runs; the help says
#: what this project does instead.
TRTLLM_FLAGS: tuple[tuple[str, str], ...] = (
    (
        "--use_gemm_plugin",
        "TensorRT-LLM GEMM plugin (dtype). Ignored: GEMM precision follows the checkpoint dtype and quantization.",
    ),
    ("--gemm_plugin", "Newer spelling of --use_gemm_plugin. Ignored for the same reason."),
    (
        "--use_gpt_attention_plugin",
        "TensorRT-LLM attention plugin (dtype). Ignored: attention with a KV cache is always built in "
        "(SDPA in the torch backend).",
    ),
    ("--gpt_attention_plugin", "Newer spelling of --use_gpt_attention_plugin. Ignored for the same reason."),
    (
        "--remove_input_padding",
        "Packed (unpadded) inputs. Ignored: batches are left-padded and masked; results are identical.",
    ),
    ("--enable_context_fmha", "Fused multi-head attention for the prompt. Ignored: SDPA picks fused kernels itself."),
    ("--context_fmha", "Newer spelling of --enable_context_fmha. Ignored for the same reason."),
    ("--use_paged_context_fmha", "Paged context FMHA. Ignored: the KV cache is one preallocated block per request."),
    ("--paged_kv_cache", "Paged KV cache. Ignored: the KV cache is preallocated for batch x max length at run time."),
    ("--use_fused_mlp", "Fused gated-MLP kernel. Ignored: Falcon's MLP is not gated."),
    ("--multiple_profiles", "Several TensorRT optimisation profiles. Ignored: shapes are dynamic in every backend."),
    ("--use_custom_all_reduce", "TensorRT-LLM's all-reduce kernel. Ignored: ranks use torch.distributed (NCCL/gloo)."),
    (
        "--strongly_typed",
        "Strongly typed TensorRT network. Accepted: the tensorrt backend always builds strongly typed networks.",
    ),
    ("--use_fp8_context_fmha", "FP8 context attention. Ignored: FP8 models use the FP8 KV cache from quantize."),
)
#: trtllm-build flags that take a value we do not use.
TRTLLM_VALUE_FLAGS: tuple[tuple[str, str], ...] = (
    ("--max_num_tokens", "Token budget of packed batches. Ignored: limits are --max_batch_size and --max_seq_len."),
    ("--max_beam_width", "Beam width limit. Ignored: --num_beams at run time allocates what it needs."),
    ("--max_prompt_embedding_table_size", "Prompt tuning table. Ignored: not supported."),
    ("--log_level", "TensorRT-LLM log level. Ignored: errors are one line; use `modelc --debug` for tracebacks."),
    ("--profiling_verbosity", "TensorRT layer profiling detail. Ignored."),
    ("--opt_num_tokens", "Optimisation target of --max_num_tokens. Ignored."),
)


def _trtllm_flags(command):
    for name, text in reversed(TRTLLM_FLAGS):
        command = accepted_flag(name, text, optional_value=True)(command)
    for name, text in reversed(TRTLLM_VALUE_FLAGS):
        command = accepted_flag(name, text, takes_value=True)(command)
    return command


@click.command("build")
@option("--checkpoint_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint from convert/quantize.")
@option("--output_dir", required=True, type=OUTPUT_DIR, help="Engine directory to write.")
@option(
    "--backend",
    default=None,
    help="torch, onnx, tensorrt, ... (`modelc plugins` lists them). Default: the most capable one usable here.",
)
@option(
    "--max_batch_size",
    default=None,
    type=POSITIVE_INT,
    help=f"Most prompts per run, enforced at run time [default: {DEFAULT_SETTINGS['max_batch_size']}].",
)
@option(
    "--max_input_len",
    default=None,
    type=POSITIVE_INT,
    help=f"Longest prompt in tokens, enforced at run time [default: {DEFAULT_SETTINGS['max_input_len']}].",
)
@option(
    "--max_seq_len",
    default=None,
    type=POSITIVE_INT,
    help="Longest prompt + output in tokens, enforced at run time [default: the model's max_position_embeddings, "
    f"else {DEFAULT_SETTINGS['max_seq_len']}].",
)
@option(
    "--max_output_len",
    default=None,
    type=POSITIVE_INT,
    help="Older trtllm-build spelling: sets --max_seq_len to --max_input_len + this (when --max_seq_len is not given).",
)
@option(
    "--workers", default=1, show_default=True, type=POSITIVE_INT, help="Build ranks in this many parallel processes."
)
@_trtllm_flags
@click.pass_obj
def build_command(
    host: Host,
    checkpoint_dir: Path,
    output_dir: Path,
    backend: str | None,
    max_batch_size: int | None,
    max_input_len: int | None,
    max_seq_len: int | None,
    max_output_len: int | None,
    workers: int,
) -> None:
    """Build an engine (config.json with the IR and build limits + per-rank artefacts) from a checkpoint."""
    if max_output_len is not None:
        if max_seq_len is not None:
            raise UsageError("--max_output_len: give either --max_seq_len or --max_output_len, not both")
        max_seq_len = (max_input_len or DEFAULT_SETTINGS["max_input_len"]) + max_output_len
    chosen, reason = choose_backend(backend, host.registry)
    click.echo(f"backend: {chosen.name} ({reason})")
    settings = {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_seq_len": max_seq_len}
    config = build_engine(
        Path(checkpoint_dir), Path(output_dir), chosen, settings, workers=workers, registry=host.registry
    )
    checkpoint = engine_checkpoint(config)
    build = config["build"]
    click.echo(
        f"built {checkpoint.architecture} engine ({chosen.name}, {checkpoint.dtype}, "
        f"{checkpoint.mapping.world_size} rank(s), max_batch_size={build['max_batch_size']} "
        f"max_input_len={build['max_input_len']} max_seq_len={build['max_seq_len']}) in {output_dir}"
    )
