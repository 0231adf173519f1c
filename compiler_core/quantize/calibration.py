"""Calibration data and statistics for post-training quantization.

Two halves, both architecture- and scheme-agnostic:

* **Data.** :func:`load_calibration_set` turns a text source into token batches:

  - ``--calib_dataset FILE``: a plain-text file (paragraphs separated by blank lines), JSONL
    with a ``text`` or ``article`` field per line, or parquet with a ``text`` or ``article``
    column; without it, the corpus modelc ships (``compiler_core/data/corpus.txt``).
  - The texts are tokenized with the model directory's tokenizer, joined with its EOS token and
    cut into blocks of ``max_seq_length`` tokens (as llm-awq does), so every sample is full
    and no padding is needed; the first ``num_samples`` blocks are kept (a shorter tail
    block is kept only when the text has too few full blocks).
  - Blocks are grouped ``batch_size`` at a time into :class:`CalibrationBatch` es
    (``input_ids`` and ``attention_mask``, both [batch, seq]).

* **Statistics.** :func:`collect_stats` runs a graph with the torch reference executor over
  every batch and calls *observers* after the nodes they watch::

      def observe(node: Node, inputs: tuple[Tensor, ...], output: Any, ctx: ForwardContext) -> None

  ``inputs`` are the tensors the node read, ``output`` what it produced (a tuple for
  multi-output nodes), and ``ctx`` the forward context: ``token_mask(ctx)`` says which
  positions are real tokens, and ``ctx.cache`` holds the batch's (full-precision) KV cache,
  so an attention observer can read the keys and values it just stored (after rotary
  embedding) from ``ctx.cache.slots[node.attrs["cache_slot"]]``. Observers accumulate into
  whatever they close over (a running amax, a list of activations). Typical use::

      graph = model_graph(registry, model)
      amax: dict[str, float] = {}
      def record(node, inputs, output, ctx):
          x = real_tokens(inputs[0], ctx)
          amax[node.name] = max(amax.get(node.name, 0.0), x.abs().max().item())
      collect_stats(registry, graph, model.weights, calibration, {n.name: record for n in graph.nodes_of("linear")})

  Only the watched nodes' kernels are wrapped, in a subclass of the executor; the
  executor's own hot path is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.errors import MissingDependencyError, TokenizerError, UsageError
from compiler_core.formats.fileio import json_lines
from compiler_core.ir import Graph, Node
from compiler_core.mapping import Mapping as ParallelMapping
from compiler_core.model import rank_graph
from compiler_core.progress import progress
from compiler_core.registry import Registry
from compiler_core.runtime.context import ForwardContext

#: Defaults of TensorRT-LLM's examples/quantization/quantize.py.
DEFAULT_CALIB_SIZE = 512
DEFAULT_MAX_SEQ_LENGTH = 512
#: Field names read from JSONL / parquet records, in order of preference.
TEXT_FIELDS = ("text", "article")
#: Files of which a Hugging Face tokenizer directory holds at least one (the vocabulary).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

Observer = Callable[[Node, tuple[torch.Tensor, ...], Any, ForwardContext], None]


@dataclass(frozen=True)
class CalibrationBatch:
    """One forward pass worth of calibration tokens (1 = real token in ``attention_mask``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class CalibrationSet:
    """Token batches to calibrate on, and where they came from."""

    batches: tuple[CalibrationBatch, ...]
    source: str

    @property
    def num_samples(self) -> int:
        return sum(b.input_ids.shape[0] for b in self.batches)

    @property
    def num_tokens(self) -> int:
        return int(sum(b.attention_mask.sum().item() for b in self.batches))


# --- data ----------------------------------------------------------------------------------


def default_corpus() -> str:
    """The calibration text modelc ships (original prose, also used to train tiny tokenizers)."""
    return resources.files("compiler_core").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def read_texts(path: Path | None) -> list[str]:
    """Texts of a calibration dataset file (see the module docstring), or of the shipped corpus."""
    if path is None:
        return _paragraphs(default_corpus())
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: calibration dataset not found")
    if path.suffix == ".parquet":
        texts = _parquet_texts(path)
    elif path.suffix in (".jsonl", ".json"):
        texts = _jsonl_texts(path)
    else:
        try:
            texts = _paragraphs(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text (use .txt, .jsonl or .parquet)") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError(f"{path}: calibration dataset holds no text")
    return texts


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, record in json_lines(path.read_text(encoding="utf-8"), str(path)):
        field = next((k for k in TEXT_FIELDS if k in record), None)
        if field is None:
            raise UsageError(f"{path}:{number}: record has no {' or '.join(map(repr, TEXT_FIELDS))} field")
        texts.append(str(record[field]))
    return texts


def _parquet_texts(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading parquet needs pyarrow (pip install 'modelc[summarize]')"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable parquet file ({exc})") from None
    field = next((k for k in TEXT_FIELDS if k in table.column_names), None)
    if field is None:
        raise UsageError(f"{path}: no {' or '.join(map(repr, TEXT_FIELDS))} column (has {table.column_names})")
    return [str(t) for t in table.column(field).to_pylist() if t is not None]


def load_tokenizer(model_dir: Path, tokenizer_dir: Path | None = None):
    """The Hugging Face tokenizer in ``tokenizer_dir``, else the one stored in ``model_dir``."""
    source = Path(tokenizer_dir if tokenizer_dir is not None else model_dir)
    if tokenizer_dir is not None and not source.is_dir():
        raise TokenizerError(f"--tokenizer_dir {source}: directory not found")
    # Checked here because transformers' own complaint about a missing tokenizer names sentencepiece
    # and tiktoken, not the directory.
    if not any((source / name).is_file() for name in VOCABULARY_FILES):
        raise TokenizerError(
            f"{source}: no tokenizer (none of {', '.join(VOCABULARY_FILES)}); calibration tokenizes text, "
            "so pass --tokenizer_dir D with the model's Hugging Face tokenizer"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("calibration needs transformers to tokenize (pip install 'modelc[hf]')") from None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        raise TokenizerError(f"{source}: no usable tokenizer for calibration ({type(exc).__name__}: {exc})") from None


def make_calibration_set(
    texts: Iterable[str],
    tokenizer,
    *,
    num_samples: int = DEFAULT_CALIB_SIZE,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    batch_size: int = 1,
    source: str = "texts",
) -> CalibrationSet:
    """Tokenize ``texts``, pack them into ``max_seq_length`` blocks and batch the first ``num_samples``."""
    for flag, value in (("--calib_size", num_samples), ("--calib_max_seq_length", max_seq_length)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = num_samples * max_seq_length
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if not stream:
        raise UsageError(f"{source}: calibration text tokenizes to nothing")
    blocks = [stream[i : i + max_seq_length] for i in range(0, min(len(stream), needed), max_seq_length)]
    full = [b for b in blocks if len(b) == max_seq_length]
    blocks = full if full else blocks
    batches = []
    for i in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[i : i + batch_size], dtype=torch.long)
        batches.append(CalibrationBatch(ids, torch.ones_like(ids)))
    return CalibrationSet(tuple(batches), source)


def load_calibration_set(
    model_dir: Path,
    dataset: Path | None = None,
    *,
    num_samples: int = DEFAULT_CALIB_SIZE,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    batch_size: int = 1,
    tokenizer_dir: Path | None = None,
) -> CalibrationSet:
    """Calibration batches from ``dataset`` (default: the shipped corpus) with ``model_dir``'s tokenizer
    (or ``tokenizer_dir``'s)."""
    texts = read_texts(dataset)
    source = str(dataset) if dataset is not None else "compiler_core/data/corpus.txt"
    return make_calibration_set(
        texts,
        load_tokenizer(model_dir, tokenizer_dir),
        num_samples=num_samples,
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        source=source,
    )


# --- statistics ----------------------------------------------------------------------------


def model_graph(registry: Registry, model) -> Graph:
    """The single-rank graph of a :class:`compiler_core.convert.from_hf.LoadedModel`, as its config describes it
    (full precision, or quantized as far as ``config.quantization`` already says)."""
    return rank_graph(registry, replace(model.config, mapping=ParallelMapping()), 0, "model being quantized")


def token_mask(ctx: ForwardContext) -> torch.Tensor:
    """[batch, seq] booleans: which of this forward's positions hold real tokens."""
    seq = ctx.positions.shape[1]
    return ctx.attention_mask[:, -seq:].bool()


def real_tokens(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The rows of a [batch, seq, ...] activation at real-token positions, as [tokens, ...]."""
    return x[token_mask(ctx)]


class ObservingExecutor(GraphExecutor):
    """A :class:`GraphExecutor` whose watched nodes report to observers after they run."""

    def __init__(
        self,
        registry: Registry,
        graph: Graph,
        weights: Mapping[str, torch.Tensor],
        observers: Mapping[str, Observer],
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(registry, graph, weights, device)
        unknown = sorted(set(observers) - {n.name for n in graph.nodes})
        if unknown:
            raise ValueError(f"graph {graph.name}: no node {unknown[0]!r} to observe")
        # An observer sees a node's own inputs and output, so its node must be a step of its own
        # (not decomposed into primitives, nor folded into another node's fused kernel).
        whole = {step.root.name: i for i, step in enumerate(self.steps) if step.nodes == (step.root,)}
        for node in graph.nodes:
            if node.name in observers:
                i = whole.get(node.name)
                if i is None or self.steps[i].root is not node:
                    raise ValueError(
                        f"graph {graph.name}: node {node.name!r} is not lowered on its own; cannot observe it"
                    )
                self.kernels[i] = _observed(self.kernels[i], node, observers[node.name])


def _observed(kernel: Callable[..., Any], node: Node, observer: Observer) -> Callable[..., Any]:
    def run(ctx: ForwardContext, *inputs: torch.Tensor) -> Any:
        out = kernel(ctx, *inputs)
        observer(node, inputs, out, ctx)
        return out

    return run


def collect_stats(
    registry: Registry,
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    calibration: CalibrationSet,
    observers: Mapping[str, Observer],
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    desc: str = "calibrate",
) -> None:
    """Run ``graph`` over every calibration batch, calling ``observers[node.name]`` after each watched node.

    ``graph`` must be a whole single-rank model (ids in, logits out), e.g. :func:`model_graph`.
    Each batch gets a fresh KV cache so attention observers can read what was stored.
    """
    executor = ObservingExecutor(registry, graph, weights, observers, device)
    (input_name,) = graph.inputs
    with torch.inference_mode():
        for batch in progress(calibration.batches, desc=desc, unit="batch", enable=show_progress):
            ids = batch.input_ids.to(executor.device)
            mask = batch.attention_mask.to(executor.device)
            ctx = ForwardContext.for_prompt(mask, cache=executor.allocate_cache(ids.shape[0], ids.shape[1]))
            executor.run({input_name: ids}, ctx)
