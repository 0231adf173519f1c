"""Summarization accuracy, as in TensorRT-LLM's ``summarize.py``: ROUGE of greedy summaries of news articles.

Each article becomes the prompt ``article + " TL;DR: "`` (stripped, " n't" joined as the example
does), tokenized with left truncation so the last ``max_input_length`` tokens survive. The engine
(and, on request, transformers on the same token ids) continues every prompt; ROUGE-1/2/L/Lsum of
the summaries against the reference highlights are reported ×100, as the mean per-article
F-measure (what HF ``evaluate``'s rouge reports), together with latency and tokens/s. The
engine-vs-HF scores compare the two models' outputs with each other: 100 means identical text.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from compiler_core.errors import MissingDependencyError, ModelcError, UsageError
from compiler_core.formats.fileio import json_lines
from compiler_core.progress import progress
from compiler_core.registry import Registry

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_MAX_INPUT_LENGTH = 923
DEFAULT_OUTPUT_LEN = 100
DEFAULT_ROUGE1_THRESHOLD = 15.0
SAMPLE_DATASET = "data/summarize_sample.jsonl"
ARTICLE, HIGHLIGHTS = "article", "highlights"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Article:
    """One dataset row in the cnn_dailymail layout."""

    article: str
    highlights: str


# --- data ------------------------------------------------------------------------------------


def load_articles(path: Path | None = None) -> list[Article]:
    """Rows of a JSONL, parquet or Arrow file with ``article`` and ``highlights``; the shipped sample if None."""
    if path is None:
        text = resources.files("compiler_core").joinpath(SAMPLE_DATASET).read_text(encoding="utf-8")
        return _rows_from_jsonl(text, SAMPLE_DATASET)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text ({exc})") from None
        rows = _rows_from_jsonl(text, str(path))
    elif suffix in (".parquet", ".arrow", ".feather", ".ipc"):
        rows = _rows_from_arrow(path)
    else:
        raise UsageError(f"{path}: unknown dataset format {suffix or '(no suffix)'!r}; use .jsonl, .parquet or .arrow")
    if not rows:
        raise UsageError(f"{path}: dataset has no rows")
    return rows


def _rows_from_jsonl(text: str, source: str) -> list[Article]:
    rows = []
    for number, record in json_lines(text, source):
        for column in (ARTICLE, HIGHLIGHTS):
            if not isinstance(record.get(column), str):
                raise UsageError(f"{source}:{number}: no string column {column!r}")
        rows.append(Article(record[ARTICLE], record[HIGHLIGHTS]))
    return rows


def _rows_from_arrow(path: Path) -> list[Article]:
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingDependencyError(
            f"{path}: reading {path.suffix} needs pyarrow (pip install 'modelc[summarize]')"
        ) from None

    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            table = _read_arrow_ipc(path)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path}: cannot read the table ({exc})") from None
    for column in (ARTICLE, HIGHLIGHTS):
        if column not in table.column_names:
            raise UsageError(f"{path}: column {column!r} is missing (columns: {', '.join(table.column_names)})")
        if not pa.types.is_string(table.schema.field(column).type) and not pa.types.is_large_string(
            table.schema.field(column).type
        ):
            raise UsageError(f"{path}: column {column!r} is {table.schema.field(column).type}, not a string")
    return [
        Article(a or "", h or "")
        for a, h in zip(table[ARTICLE].to_pylist(), table[HIGHLIGHTS].to_pylist(), strict=True)
    ]


def _read_arrow_ipc(path: Path):
    """An Arrow IPC file, or a stream (the format of Hugging Face ``datasets`` cache files)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()


# --- prompts ---------------------------------------------------------------------------------


def prompt_text(article: str) -> str:
    """The example's prompt: the article, then " TL;DR: ", stripped, with " n't" joined to its word."""
    return (article + " TL;DR: ").strip().replace(" n't", "n't")


def prompt_ids(tokenizer: Any, article: str, max_input_length: int) -> list[int]:
    """Token ids of the article's prompt, truncated on the left to the last ``max_input_length`` tokens."""
    if max_input_length < 1:
        raise UsageError(f"--max_input_length must be at least 1, got {max_input_length}")
    # Left truncation keeps the end of the article and the " TL;DR:" cue the model continues from.
    tokenizer.truncation_side = "left"
    return list(tokenizer(prompt_text(article), truncation=True, max_length=max_input_length)["input_ids"])


# --- ROUGE -----------------------------------------------------------------------------------


def sentence_lines(text: str) -> str:
    """Sentences one per line: rougeLsum scores the summary-level LCS over newline-separated sentences."""
    sentences = [s for line in text.strip().splitlines() for s in _SENTENCE_END.split(line.strip()) if s]
    return "\n".join(sentences)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum ×100: the mean over examples of each F-measure (Porter stemming on)."""
    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(sentence_lines(reference), sentence_lines(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def agreement(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE of one model's outputs against another's, where identical texts always score 100.

    rouge_score gives 0 to a pair with no words (a random tiny model often emits only symbols)
    and rouge2 gives 0 to a pair of one-word texts, even when the two texts are equal.
    """
    pairs = list(zip(predictions, references, strict=True))
    differing = [(p, r) for p, r in pairs if p != r]
    if not differing:
        return dict.fromkeys(ROUGE_KEYS, 100.0)
    scores = rouge([p for p, _ in differing], [r for _, r in differing])
    same = len(pairs) - len(differing)
    return {key: (100.0 * same + value * len(differing)) / len(pairs) for key, value in scores.items()}


# --- generation ------------------------------------------------------------------------------


@dataclass
class Generated:
    """One model's summaries (beam 0 per article) and how long producing them took."""

    texts: list[str]
    tokens: int
    latency_s: float

    def metrics(self, references: Sequence[str]) -> dict[str, float]:
        """ROUGE against ``references`` plus latency and throughput."""
        return {
            **rouge(self.texts, references),
            "latency_s": self.latency_s,
            "tokens_per_s": self.tokens / self.latency_s if self.latency_s > 0 else 0.0,
        }


def batches(prompts: list[list[int]], batch_size: int, max_ite: int) -> list[list[list[int]]]:
    """At most ``max_ite`` consecutive batches of ``batch_size`` prompts (the last may be shorter)."""
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    if max_ite < 1:
        raise UsageError(f"--max_ite must be at least 1, got {max_ite}")
    return [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)][:max_ite]


def _timed(
    work: Sequence[list[list[int]]],
    step: Callable[[list[list[int]]], list[list[int]]],
    tokenizer: Any,
    desc: str,
    show_progress: bool,
) -> Generated:
    texts, tokens, elapsed = [], 0, 0.0
    for batch in progress(work, desc=desc, unit="batch", enable=show_progress):
        start = time.perf_counter()
        outputs = step(batch)
        elapsed += time.perf_counter() - start
        tokens += sum(len(o) for o in outputs)
        texts += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    return Generated(texts, tokens, elapsed)


def run_engine(
    runner: Any, work: Sequence[list[list[int]]], config: Any, tokenizer: Any, show_progress: bool = True
) -> Generated:
    """Summaries from a runner (every rank of an mpirun job calls this with the same prompts)."""
    from compiler_core.runtime.generation import generate

    def step(batch: list[list[int]]) -> list[list[int]]:
        return [beams[0] for beams in generate(runner, batch, config)]

    return _timed(work, step, tokenizer, "summarize (engine)", show_progress)


def run_hf(
    model_dir: Path,
    work: Sequence[list[list[int]]],
    config: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    show_progress: bool = True,
) -> Generated:
    """Summaries from transformers' ``AutoModelForCausalLM`` (sdpa) on the same left-padded token ids."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--hf_model_dir {model_dir}: cannot load the model ({exc})") from None
    model = model.to(device).eval()
    from compiler_core.runtime.generation import trim_after_stop

    stops = config.stop_ids
    pad_id = config.pad_id if config.pad_id is not None else (stops[0] if stops else 0)
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p or 1.0}
        if config.sampling
        else {"do_sample": False}
    )

    def step(batch: list[list[int]]) -> list[list[int]]:
        length = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch], device=device)
        if config.sampling:
            torch.manual_seed(config.seed or 0)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=config.max_new_tokens,
                num_beams=config.num_beams,
                eos_token_id=list(stops) or None,
                pad_token_id=pad_id,
                **sampling,
            )
        return [trim_after_stop(row, stops) for row in out[:, length:].tolist()]

    return _timed(work, step, tokenizer, "summarize (hf)", show_progress)


# --- report ----------------------------------------------------------------------------------


def format_report(report: dict[str, dict[str, float]]) -> str:
    """The example's printout: latency, then each ROUGE score, per model."""
    titles = {"engine": "engine", "hf": "Hugging Face", "engine_vs_hf": "engine vs Hugging Face (agreement)"}
    lines = []
    for section, values in report.items():
        if "latency_s" in values:
            lines.append(
                f"{titles[section]} (total latency: {values['latency_s']:.3f} s, {values['tokens_per_s']:.1f} tokens/s)"
            )
        else:
            lines.append(titles[section])
        lines += [f"  {key} : {values[key]:.4f}" for key in ROUGE_KEYS]
    return "\n".join(lines)


def check_accuracy(report: dict[str, dict[str, float]], threshold: float) -> None:
    """Raise ModelcError (exit 1) when a model's rouge1 is not above ``threshold``."""
    for section in ("engine", "hf"):
        if section in report and report[section]["rouge1"] <= threshold:
            raise ModelcError(
                f"accuracy check failed: {section} rouge1 {report[section]['rouge1']:.4f} "
                f"is not above --tensorrt_llm_rouge1_threshold {threshold}"
            )


def write_report(path: Path, report: dict[str, dict[str, float]]) -> None:
    """Write the JSON report atomically (a crash leaves the old file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the whole job ---------------------------------------------------------------------------


def summarize(
    engine_dir: Path,
    *,
    hf_model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    dataset: Path | None = None,
    test_engine: bool = True,
    test_hf: bool = False,
    max_ite: int = 20,
    batch_size: int = 1,
    output_len: int = DEFAULT_OUTPUT_LEN,
    max_input_length: int = DEFAULT_MAX_INPUT_LENGTH,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
    registry: Registry | None = None,
) -> dict[str, dict[str, float]] | None:
    """Summarize the dataset with the engine and/or transformers and score both.

    Returns the report (``engine``, ``hf``, ``engine_vs_hf`` sections, whichever apply) on rank 0;
    other ranks of an mpirun job generate alongside rank 0 and return None. ``registry`` holds
    the plugins that run the engine (default: the installed ones, loaded for this call).
    """
    from compiler_core.build.engine import engine_checkpoint, read_engine_config
    from compiler_core.dtypes import torch_dtype
    from compiler_core.runtime.generation import GenerationConfig
    from compiler_core.runtime.open import (
        is_output_rank,
        load_tokenizer,
        open_runner,
        resolve_device,
        special_ids,
        stop_ids,
    )

    engine_dir = Path(engine_dir)
    engine_config = read_engine_config(engine_dir)
    if test_hf and hf_model_dir is None:
        raise UsageError("--test_hf needs --hf_model_dir")
    if not (test_engine or test_hf):
        raise UsageError("nothing to test: give --test_trt_llm and/or --test_hf")
    # The tokenizer: --tokenizer_dir, else the engine's own, else the Hugging Face model's.
    tokenizer = load_tokenizer(engine_dir, tokenizer_dir, required=hf_model_dir is None)
    if tokenizer is None:
        tokenizer = load_tokenizer(engine_dir, hf_model_dir)
    _, pad_id = special_ids(engine_config, tokenizer)
    articles = load_articles(dataset)[: max(batch_size, 1) * max(max_ite, 1)]
    work = batches([prompt_ids(tokenizer, a.article, max_input_length) for a in articles], batch_size, max_ite)
    config = GenerationConfig(
        max_new_tokens=output_len,
        num_beams=num_beams,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        end_ids=stop_ids(engine_config, tokenizer),
        pad_id=pad_id,
    )
    main = is_output_rank()
    report: dict[str, dict[str, float]] = {}
    engine, hf_device = None, None
    if test_engine:
        runner, _ = open_runner(engine_dir, device, registry)
        main = getattr(runner, "rank", 0) == 0
        engine = run_engine(runner, work, config, tokenizer, show_progress and main)
        hf_device = runner.device
    if not main:
        return None
    references = [a.highlights for a in articles]
    if engine is not None:
        report["engine"] = engine.metrics(references)
    if test_hf:
        dtype = torch_dtype(engine_checkpoint(engine_config).dtype)
        hf_device = hf_device or resolve_device(device)
        hf = run_hf(Path(hf_model_dir), work, config, tokenizer, dtype, hf_device, show_progress)
        report["hf"] = hf.metrics(references)
        if engine is not None:
            report["engine_vs_hf"] = agreement(engine.texts, hf.texts)
    return report
