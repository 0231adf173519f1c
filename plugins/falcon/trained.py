"""A tiny Falcon trained on the corpus modelc ships, so that its greedy text is English-like.

This is the demo's model: random weights give gibberish and ROUGE 0, which shows the workflow but
not whether an engine (or a quantized one) keeps what a model has learnt. Training runs on CPU in
one torch thread with fixed seeds, so the same machine and library versions give the same bytes.

Results are cached under ``cache_dir()/tiny-falcon/`` (``$MODELC_CACHE_DIR``, else
``$XDG_CACHE_HOME/modelc``, else ``~/.cache/modelc``) in a directory named by a hash of everything
that decides the weights: the corpus, the variant, the recipe, the saved dtype, the source of this
module and of ``tiny.py``, the torch/transformers/tokenizers versions and the CPU's instruction set.
An entry is built in a temporary sibling and renamed into place, so a concurrent or interrupted
run never leaves a half-written entry; of two concurrent runs, the first rename wins and the other
uses that entry (its own is identical).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from compiler_core.backends.torch.native import cache_dir
from compiler_core.formats.fileio import atomic_output_dir, read_json, write_json
from compiler_core.progress import progress
from modelc_plugins.falcon.testing import single_torch_thread
from modelc_plugins.falcon.tiny import EOS_TOKEN, TINY_FALCON_OUTPUT, corpus_text, tiny_config, train_tokenizer

TRAINING_RECORD = "training.json"


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything besides the variant and the library versions that decides the trained weights.

    With two layers the defaults train in about 30 s (one thread), to a loss near 1.5 on
    the 18k-token corpus: greedy text of real words and plausible phrases. The 2048-token vocabulary
    makes most words one token, which a model this small strings together far better than pieces.
    """

    num_layers: int = 3
    hidden_size: int = 128
    vocab_size: int = 2048
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 1e-2
    warmup_steps: int = 40
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class TrainedFalcon:
    """A trained checkpoint directory, the mean loss of its last training steps, and whether it came from the cache."""

    path: Path
    final_loss: float
    from_cache: bool


def make_trained_tiny_falcon(
    out_dir: Path,
    variant: str,
    recipe: TrainingRecipe = TrainingRecipe(),
    *,
    dtype: str = "float32",
    cache_root: Path | None = None,
    show_progress: bool = True,
) -> TrainedFalcon:
    """Write the trained tiny Falcon of ``variant`` to ``out_dir``, training it only when the cache lacks it."""
    cached = cached_trained_falcon(variant, recipe, dtype=dtype, cache_root=cache_root, show_progress=show_progress)
    with atomic_output_dir(Path(out_dir), TINY_FALCON_OUTPUT) as tmp:
        shutil.copytree(cached.path, tmp, dirs_exist_ok=True)
    return replace(cached, path=Path(out_dir))


def cached_trained_falcon(
    variant: str,
    recipe: TrainingRecipe = TrainingRecipe(),
    *,
    dtype: str = "float32",
    cache_root: Path | None = None,
    show_progress: bool = True,
) -> TrainedFalcon:
    """The cache entry of this variant, recipe and dtype, trained first when it is missing."""
    root = Path(cache_root or cache_dir()) / "tiny-falcon"
    entry = root / f"{variant}-{cache_key(variant, recipe, dtype)}"
    from_cache = entry.is_dir()
    if not from_cache:
        root.mkdir(parents=True, exist_ok=True)
        # Dot-prefixed so that no reader mistakes a build in progress for an entry.
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            train_tiny_falcon(tmp, variant, recipe, dtype=dtype, show_progress=show_progress)
            _publish(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record = read_json(entry / TRAINING_RECORD, "training record")
    return TrainedFalcon(entry, record["final_loss"], from_cache)


def _publish(tmp: Path, entry: Path) -> None:
    try:
        os.rename(tmp, entry)
    except OSError:
        # A concurrent run renamed its (identical) entry into place first: use that one.
        if not entry.is_dir():
            raise


def cache_key(variant: str, recipe: TrainingRecipe, dtype: str) -> str:
    """A hash of everything that decides the trained weights' bytes."""
    import tokenizers
    import torch
    import transformers

    from modelc_plugins.falcon import tiny

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    parts = {
        "corpus": digest(corpus_text().encode()),
        "variant": variant,
        "recipe": asdict(recipe),
        "dtype": dtype,
        "code": [digest(Path(module.__file__).read_bytes()) for module in (tiny, sys.modules[__name__])],
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
        # Kernels differ by instruction set, and with them the last bits of every float.
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    return digest(json.dumps(parts, sort_keys=True).encode())[:16]


def train_tiny_falcon(
    out_dir: Path, variant: str, recipe: TrainingRecipe, *, dtype: str = "float32", show_progress: bool = True
) -> None:
    """Train a tiny Falcon and its tokenizer on the shipped corpus; write them and ``training.json`` to ``out_dir``."""
    import torch
    from transformers import FalconForCausalLM

    tokenizer = train_tokenizer(recipe.vocab_size)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = tiny_config(
        variant,
        vocab_size=len(tokenizer),
        num_layers=recipe.num_layers,
        hidden_size=recipe.hidden_size,
        initializer_range=0.02,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    ids = torch.tensor(tokenizer(corpus_text())["input_ids"])
    # One thread: the same bytes on any core count, and the fastest for 128-wide layers on a busy machine.
    with single_torch_thread():
        torch.manual_seed(recipe.seed)
        model = FalconForCausalLM(config)
        final_loss = fit(model, ids, recipe, show_progress)
    # Marked as modelc's own output, so that a later tiny-falcon run may replace it (and nothing else).
    setattr(model.config, TINY_FALCON_OUTPUT.field, TINY_FALCON_OUTPUT.marker)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, max_shard_size="1MB")
    tokenizer.save_pretrained(out_dir)
    write_json(
        Path(out_dir) / TRAINING_RECORD,
        {"variant": variant, "recipe": asdict(recipe), "corpus_tokens": len(ids), "final_loss": final_loss},
    )


def fit(model, ids, recipe: TrainingRecipe, show_progress: bool = True) -> float:
    """AdamW on random windows of ``ids`` (warmup, then cosine decay to a tenth); the mean loss of the last 20 steps."""
    import torch

    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )

    def lr_factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        return warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * step / recipe.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    model.train()
    for _ in progress(range(recipe.steps), desc="train tiny Falcon", unit="step", enable=show_progress):
        starts = torch.randint(0, len(ids) - recipe.seq_len, (recipe.batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)
