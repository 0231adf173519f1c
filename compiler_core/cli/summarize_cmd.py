"""``modelc summarize``: ROUGE of an engine's (and transformers') summaries, as TensorRT-LLM's summarize.py."""

from __future__ import annotations

from pathlib import Path

import click

from compiler_core.cli.options import NON_NEGATIVE_INT, OUTPUT_FILE, POSITIVE_INT, FiniteFloat, accepted_flag, option
from compiler_core.evaluate.summarize import (
    DEFAULT_MAX_INPUT_LENGTH,
    DEFAULT_OUTPUT_LEN,
    DEFAULT_ROUGE1_THRESHOLD,
    format_report,
    summarize,
    write_report,
)
from compiler_core.evaluate.summarize import check_accuracy as require_rouge1
from compiler_core.host import Host

_DIR = click.Path(file_okay=False, path_type=Path)


@click.command("summarize")
@option("--engine_dir", required=True, type=_DIR, help="Engine directory from `modelc build`.")
@option("--hf_model_dir", type=_DIR, help="Hugging Face model: the --test_hf reference, and a tokenizer fallback.")
@option("--tokenizer_dir", type=_DIR, help="Tokenizer directory [default: the engine's own, else --hf_model_dir].")
@option("--test_trt_llm", is_flag=True, help="Score the engine (the default when neither --test_* flag is given).")
@option("--test_hf", is_flag=True, help="Score transformers' AutoModelForCausalLM (sdpa, the engine's dtype).")
@option(
    "--dataset",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL, parquet or Arrow file with 'article' and 'highlights' columns [default: the shipped sample].",
)
@option("--max_ite", default=20, show_default=True, type=POSITIVE_INT, help="Number of batches to run.")
@option("--batch_size", default=1, show_default=True, type=POSITIVE_INT, help="Articles per batch.")
@option(
    "--output_len", default=DEFAULT_OUTPUT_LEN, show_default=True, type=POSITIVE_INT, help="New tokens per summary."
)
@option(
    "--max_input_length",
    default=DEFAULT_MAX_INPUT_LENGTH,
    show_default=True,
    type=POSITIVE_INT,
    help="Prompt tokens kept (left truncation: the article's end and the TL;DR cue survive).",
)
@option("--num_beams", default=1, show_default=True, type=POSITIVE_INT, help="Beam width (beam 0 is scored).")
@option("--temperature", default=1.0, show_default=True, type=FiniteFloat(minimum=0), help="Sampling temperature.")
@option("--top_k", default=1, show_default=True, type=NON_NEGATIVE_INT, help="Top-k sampling; 1 is greedy.")
@option("--top_p", default=0.0, show_default=True, type=FiniteFloat(0, 1), help="Top-p sampling; 0 is off.")
@option("--random_seed", default=0, show_default=True, type=NON_NEGATIVE_INT, help="Seed for sampling.")
@option("--check_accuracy", is_flag=True, help="Exit 1 when rouge1 is not above the threshold.")
@option(
    "--tensorrt_llm_rouge1_threshold",
    default=DEFAULT_ROUGE1_THRESHOLD,
    show_default=True,
    type=FiniteFloat(),
    help="rouge1 (x100) that --check_accuracy requires.",
)
@option("--output_json", type=OUTPUT_FILE, help="Write the scores as JSON here.")
@option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (under mpirun: cuda:local_rank).")
@accepted_flag("--data_type", "TensorRT-LLM's HF dtype; here --test_hf runs in the engine's dtype.", takes_value=True)
@accepted_flag("--eval_task", "TensorRT-LLM's task selector; only summarization is implemented.", takes_value=True)
@accepted_flag("--log_level", "TensorRT-LLM's log level; modelc prints results and one-line errors.", takes_value=True)
@accepted_flag("--use_py_session", "TensorRT-LLM's Python runtime switch; the engine's backend decides here.")
@click.pass_obj
def summarize_command(
    host: Host,
    engine_dir: Path,
    hf_model_dir: Path | None,
    tokenizer_dir: Path | None,
    test_trt_llm: bool,
    test_hf: bool,
    dataset: Path | None,
    max_ite: int,
    batch_size: int,
    output_len: int,
    max_input_length: int,
    num_beams: int,
    temperature: float,
    top_k: int,
    top_p: float,
    random_seed: int,
    check_accuracy: bool,
    tensorrt_llm_rouge1_threshold: float,
    output_json: Path | None,
    device: str,
) -> None:
    """Summarize news articles with the engine (and transformers); print ROUGE-1/2/L/Lsum and tokens/s.

    Under `mpirun -n W` every rank generates and rank 0 prints and writes. Exit 1 when
    --check_accuracy fails.
    """
    report = summarize(
        engine_dir,
        hf_model_dir=hf_model_dir,
        tokenizer_dir=tokenizer_dir,
        dataset=dataset,
        test_engine=test_trt_llm or not test_hf,
        test_hf=test_hf,
        max_ite=max_ite,
        batch_size=batch_size,
        output_len=output_len,
        max_input_length=max_input_length,
        num_beams=num_beams,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=random_seed,
        device=device,
        registry=host.registry,
    )
    if report is None:  # not rank 0
        return
    click.echo(format_report(report))
    if output_json is not None:
        write_report(output_json, report)
    if check_accuracy:
        require_rouge1(report, tensorrt_llm_rouge1_threshold)
