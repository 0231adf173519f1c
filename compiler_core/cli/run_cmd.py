"""``modelc run``: generate from one or more prompts with a built engine (TensorRT-LLM's run.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from compiler_core.cli.options import NON_NEGATIVE_INT, OUTPUT_FILE, POSITIVE_INT, FiniteFloat, accepted_flag, option
from compiler_core.errors import UsageError
from compiler_core.host import Host


def parse_input_ids(values: tuple[str, ...], vocab_size: int | None) -> list[list[int]]:
    """``"1,2,3"`` per prompt -> token id lists, checked against the model's vocabulary."""
    prompts = []
    for text in values:
        try:
            ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
        except ValueError:
            raise UsageError(f"--input_ids {text!r}: expected comma-separated token ids like 1,2,3") from None
        if not ids:
            raise UsageError(f"--input_ids {text!r}: no token ids")
        bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
        if bad:
            raise UsageError(f"--input_ids {text!r}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        prompts.append(ids)
    return prompts


def encode_texts(tokenizer, texts: tuple[str, ...], add_special_tokens: bool) -> list[list[int]]:
    """One token id list per --input_text; an empty encoding is a usage error."""
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise UsageError(f"--input_text {text!r}: encodes to no tokens")
        prompts.append(list(ids))
    return prompts


def run_result(outputs: list[list[list[int]]], tokenizer) -> dict[str, Any]:
    """The --output_json document: generated ids (and text) per input and beam, in input order."""
    flat = [beam for beams in outputs for beam in beams]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else None for ids in flat]
    return {"output_ids": flat, "output_text": texts}


@click.command("run")
@option("--engine_dir", required=True, type=click.Path(path_type=Path), help="Engine directory from `modelc build`.")
@option("--input_text", multiple=True, help="A prompt (repeat for a batch). Needs a tokenizer.")
@option("--input_ids", multiple=True, help='A prompt as token ids, e.g. "1,2,3" (repeat for a batch).')
@option(
    "--tokenizer_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Tokenizer directory [default: the engine's tokenizer/].",
)
@option("--max_output_len", required=True, type=POSITIVE_INT, help="Most new tokens per prompt.")
@option(
    "--num_beams", default=1, show_default=True, type=POSITIVE_INT, help="Beam search width (1: greedy or sampling)."
)
@option(
    "--temperature",
    default=1.0,
    show_default=True,
    type=FiniteFloat(minimum=0),
    help="Sampling temperature (0: greedy).",
)
@option(
    "--top_k",
    default=0,
    show_default=True,
    type=NON_NEGATIVE_INT,
    help="Sample from the k most likely tokens (0: off).",
)
@option("--top_p", default=1.0, show_default=True, type=FiniteFloat(0, 1), help="Nucleus sampling mass (0 or 1: off).")
@option("--do_sample", is_flag=True, default=None, help="Sample even at temperature 1 with no top-k/top-p.")
@option("--seed", default=None, type=NON_NEGATIVE_INT, help="Random seed for sampling [default: 0].")
@option(
    "--end_id",
    multiple=True,
    type=NON_NEGATIVE_INT,
    help="Stop token; repeat for several [default: the model's eos_token_id, one or a list].",
)
@option("--pad_id", default=None, type=NON_NEGATIVE_INT, help="Padding token [default: the model's pad, else end id].")
@option(
    "--length_penalty", default=1.0, show_default=True, type=FiniteFloat(), help="Beam score = logprob / length^this."
)
@option(
    "--early_stopping",
    default="0",
    show_default=True,
    type=click.Choice(["0", "1", "never"]),
    help="Beam search stop rule, as transformers' early_stopping (False / True / 'never').",
)
@option("--no_add_special_tokens", is_flag=True, help="Encode --input_text without the tokenizer's special tokens.")
@option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@option("--output_json", default=None, type=OUTPUT_FILE, help="Write output ids and text here.")
@accepted_flag("--use_py_session", "TensorRT-LLM's Python session. Ignored: there is one runtime.")
@accepted_flag("--log_level", "TensorRT-LLM log level. Ignored.", takes_value=True)
@click.pass_obj
def run_command(
    host: Host,
    engine_dir: Path,
    input_text: tuple[str, ...],
    input_ids: tuple[str, ...],
    tokenizer_dir: Path | None,
    max_output_len: int,
    num_beams: int,
    temperature: float,
    top_k: int,
    top_p: float,
    do_sample: bool | None,
    seed: int | None,
    end_id: tuple[int, ...],
    pad_id: int | None,
    length_penalty: float,
    early_stopping: str,
    no_add_special_tokens: bool,
    device: str,
    output_json: Path | None,
) -> None:
    """Generate from prompts given as text or token ids; all prompts run as one batch.

    Prints each input and its output(s); --output_json gets {"output_ids", "output_text"}
    with generated tokens only, one entry per input (per input and beam with --num_beams).
    Under mpirun every rank computes and rank 0 prints and writes.
    """
    from compiler_core.build.engine import engine_checkpoint, read_engine_config
    from compiler_core.runtime.generation import GenerationConfig, generate
    from compiler_core.runtime.open import is_output_rank, load_tokenizer, open_runner, special_ids, stop_ids

    if bool(input_text) == bool(input_ids):
        raise UsageError("give the prompts with either --input_text or --input_ids (one or more times), not both")
    # Check everything cheap before loading weights.
    config = GenerationConfig(
        max_new_tokens=max_output_len,
        num_beams=num_beams,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        do_sample=do_sample,
        length_penalty=length_penalty,
        early_stopping={"0": False, "1": True}.get(early_stopping, early_stopping),
    )
    engine_config = read_engine_config(Path(engine_dir))
    tokenizer = load_tokenizer(engine_dir, tokenizer_dir, required=bool(input_text))
    if input_text:
        prompts = encode_texts(tokenizer, input_text, not no_add_special_tokens)
    else:
        prompts = parse_input_ids(input_ids, engine_checkpoint(engine_config).model.get("vocab_size"))
    _, default_pad = special_ids(engine_config, tokenizer)
    config.end_ids = end_id or stop_ids(engine_config, tokenizer)
    config.pad_id = default_pad if pad_id is None else pad_id

    runner, _ = open_runner(Path(engine_dir), device, host.registry)
    outputs = generate(runner, prompts, config)
    if not is_output_rank():
        return
    result = run_result(outputs, tokenizer)
    per_input = len(outputs[0])
    for i, prompt in enumerate(prompts):
        shown = input_text[i] if input_text else ",".join(map(str, prompt))
        click.echo(f'Input [Text {i}]: "{shown}"')
        for b in range(per_input):
            k = i * per_input + b
            text = result["output_text"][k]
            shown = text if text is not None else ",".join(map(str, result["output_ids"][k]))
            click.echo(f'Output [Text {i} Beam {b}]: "{shown}"')
    if output_json is not None:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(result) + "\n", encoding="utf-8")
        click.echo(f"wrote {output_json}")
