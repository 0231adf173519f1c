"""Tiny Hugging Face Falcon checkpoints made locally: random weights, real files, real tokenizer.

Used by the tests (every variant); the README's demo uses the trained ones of ``trained.py``.
Nothing is downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers`` on the
corpus modelc ships.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import click

from compiler_core.cli.options import option
from compiler_core.formats.fileio import OutputKind, atomic_output_dir

#: Config overrides per variant; shapes are tiny but every structural flag is the real one's.
VARIANTS: dict[str, dict[str, Any]] = {
    # falcon-rw-1b: ALiBi, MHA with interleaved QKV, sequential block, biases.
    "rw": {
        "alibi": True,
        "multi_query": False,
        "parallel_attn": False,
        "bias": True,
        "new_decoder_architecture": False,
        "num_attention_heads": 4,
    },
    # falcon-7b: rotary, multi-query, parallel attention with one layer norm, no biases.
    "7b": {"alibi": False, "multi_query": True, "parallel_attn": True, "bias": False, "num_attention_heads": 4},
    # falcon-40b: new decoder architecture, grouped KV heads, ln_attn + ln_mlp.
    "40b": {"new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2, "bias": False},
    # falcon-180B: as 40b but its config also says multi_query=true (ignored by the new architecture).
    "180b": {
        "new_decoder_architecture": True,
        "multi_query": True,
        "num_attention_heads": 8,
        "num_kv_heads": 2,
        "bias": False,
    },
    # Falcon2-11B: new decoder architecture with a single shared layer norm.
    "falcon2": {
        "new_decoder_architecture": True,
        "num_ln_in_parallel_attn": 1,
        "num_attention_heads": 8,
        "num_kv_heads": 2,
        "bias": False,
        "rope_theta": 500000.0,
    },
}

#: What ``modelc tiny-falcon`` writes, marked in its config.json: only an earlier tiny Falcon is
#: replaced, never a real model.
TINY_FALCON_OUTPUT = OutputKind("tiny Falcon", "tiny-falcon", field="modelc_output")

DEFAULT_VOCAB = 390
EOS_TOKEN = "<|endoftext|>"


def corpus_text() -> str:
    return resources.files("compiler_core").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB):
    """A byte-level BPE tokenizer trained on the shipped corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def tiny_config(variant: str, *, vocab_size: int, num_layers: int = 3, hidden_size: int = 64, **overrides: Any):
    from transformers import FalconConfig

    if variant not in VARIANTS:
        raise click.BadParameter(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})", param_hint="--variant")
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "initializer_range": 0.25,
        "max_position_embeddings": 512,
        **VARIANTS[variant],
        **overrides,
    }
    theta = fields.pop("rope_theta", None)
    config = FalconConfig(**fields)
    if theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return config


def make_tiny_falcon(
    out_dir: Path,
    variant: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    num_layers: int = 3,
    max_shard_size: str = "64KB",
    tokenizer=None,
    **overrides: Any,
) -> Path:
    """Write a random-weight Falcon checkpoint (several safetensors shards) plus tokenizer."""
    import torch
    from transformers import FalconForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = tiny_config(
        variant,
        vocab_size=len(tokenizer),
        num_layers=num_layers,
        bos_token_id=eos,
        eos_token_id=eos,
        **overrides,
    )
    torch.manual_seed(seed)
    model = FalconForCausalLM(config)
    randomize_norms_and_biases(model)
    model = model.to(getattr(torch, dtype)).eval()
    setattr(model.config, TINY_FALCON_OUTPUT.field, TINY_FALCON_OUTPUT.marker)
    with atomic_output_dir(Path(out_dir), TINY_FALCON_OUTPUT) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def randomize_norms_and_biases(model) -> None:
    """Give layer norms and biases random values: transformers initialises them to 1 and 0, which
    would let a converter that drops or misplaces one go unnoticed by every parity check."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.2)


@click.command("tiny-falcon")
@option("--output_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where to write it.")
@option("--variant", default="rw", show_default=True, type=click.Choice(sorted(VARIANTS)), help="Falcon flavour.")
@option("--num_layers", default=3, show_default=True, type=int, help="Decoder layers.")
@option("--seed", default=0, show_default=True, type=int, help="Weight initialisation (and training batch) seed.")
@option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@option(
    "--trained",
    is_flag=True,
    help="Train it on the corpus modelc ships (deterministic, about a minute on two CPU cores, cached in "
    "$MODELC_CACHE_DIR, else ~/.cache/modelc) so that its text is English-like; without it the weights are random.",
)
def tiny_falcon_command(output_dir: Path, variant: str, num_layers: int, seed: int, dtype: str, trained: bool) -> None:
    """Make a tiny Hugging Face Falcon checkpoint locally (no downloads): random weights, or --trained."""
    if not trained:
        make_tiny_falcon(output_dir, variant, seed=seed, dtype=dtype, num_layers=num_layers)
        click.echo(f"wrote tiny Falcon ({variant}, {num_layers} layers, random weights) to {output_dir}")
        return
    from modelc_plugins.falcon.trained import TrainingRecipe, make_trained_tiny_falcon

    recipe = TrainingRecipe(num_layers=num_layers, seed=seed)
    made = make_trained_tiny_falcon(output_dir, variant, recipe, dtype=dtype)
    origin = "from the cache" if made.from_cache else "trained now"
    click.echo(
        f"wrote tiny Falcon ({variant}, {num_layers} layers, trained on the shipped corpus for {recipe.steps} steps, "
        f"final loss {made.final_loss:.2f}, {origin}) to {output_dir}"
    )
