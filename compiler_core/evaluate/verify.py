"""Parity of a converted checkpoint with the Hugging Face model it came from.

The checkpoint runs on the reference executor (every rank in this process, combined as the
parallel run combines them); the source model runs in transformers (``AutoModelForCausalLM``,
SDPA attention, the checkpoint's dtype) on the same left-padded batch. Two things are compared:

* logits: every real (non-pad) prompt position, plus the logits of each greedy step as long as
  both sides have produced the same tokens so far (so the KV-cache decode path is covered);
* greedy tokens: ``steps`` tokens from a small greedy loop on the runner against
  ``generate(do_sample=False)``.

Nothing here knows a model family: the checkpoint's architecture plugin builds the graphs and
transformers' own auto classes build the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler_core.dtypes import torch_dtype
from compiler_core.errors import ModelcError, UsageError
from compiler_core.formats.checkpoint import TOKENIZER_DIR, read_config
from compiler_core.formats.checkpoint_config import CheckpointConfig
from compiler_core.registry import Registry
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.runner import ModelRunner

#: Two prompts of different lengths, so that left padding is always exercised.
DEFAULT_PROMPTS = (
    "The river that runs through the old town was frozen for most of the winter, and the children",
    "Cooking rice well takes",
)
#: Token ids used when neither the model nor the checkpoint has a tokenizer (lengths 11 and 6).
FALLBACK_LENGTHS = (11, 6)

#: Absolute logit tolerance for float32: two correct fp32 implementations of the same model agree
#: to ~1e-5 on logits of magnitude 5-10 (different summation order only).
FP32_ATOL = 1e-4
#: Relative tolerances for half types, times the largest |logit| of the reference. Both sides
#: round every intermediate to the half type, but in different places (fused vs split QKV,
#: SDPA kernels, bias added after the all-reduce), so they differ by a few units of the type's
#: precision per layer: fp16 eps = 2^-10 ~ 1e-3, bf16 eps = 2^-7 ~ 7.8e-3. 2% and 6% of the logit
#: scale are ~20 and ~8 eps; a wrong weight layout or a missing bias moves logits by tens of
#: percent (see plugins/falcon/tests).
HALF_RTOL = {"float16": 0.02, "bfloat16": 0.08}


def default_tolerance(dtype: str, logit_scale: float) -> float:
    """The largest acceptable |logit difference| for a checkpoint of ``dtype``."""
    if dtype == "float32":
        return FP32_ATOL
    if dtype in HALF_RTOL:
        return HALF_RTOL[dtype] * max(1.0, logit_scale)
    raise UsageError(f"dtype {dtype!r}: no default tolerance; pass --tolerance")


@dataclass
class Batch:
    """A left-padded batch: ``ids`` and ``mask`` are [batch, length]; ``lengths`` per prompt."""

    ids: torch.Tensor
    mask: torch.Tensor
    pad_id: int
    source: str

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(-1)]


def left_pad(rows: list[list[int]], pad_id: int, source: str) -> Batch:
    """Left-pad token lists into one batch (as ``padding_side="left"`` tokenizers do)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError(f"{source}: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return Batch(ids, mask, pad_id, source)


def find_tokenizer(*dirs: Path) -> Any | None:
    """The first tokenizer that transformers can load from ``dirs`` (None when there is none)."""
    from transformers import AutoTokenizer

    for d in dirs:
        if (Path(d) / "tokenizer.json").is_file() or (Path(d) / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(d))
            except (OSError, ValueError) as exc:
                raise UsageError(f"{d}: tokenizer cannot be loaded ({exc})") from None
    return None


def make_batch(
    model_dir: Path,
    checkpoint_dir: Path,
    vocab_size: int,
    prompts: list[str] | None = None,
    input_ids: list[list[int]] | None = None,
) -> Batch:
    """The batch to verify on: explicit ids, else prompts tokenized with the model's (or the
    checkpoint's) tokenizer, else fixed ids when there is no tokenizer at all."""
    vocab = vocab_size
    if input_ids:
        bad = [t for row in input_ids for t in row if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"--input_ids: token {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return left_pad(input_ids, 0, "--input_ids")
    tokenizer = find_tokenizer(model_dir, Path(checkpoint_dir) / TOKENIZER_DIR)
    if tokenizer is None:
        if prompts:
            raise UsageError(f"{model_dir}: no tokenizer to encode --prompts; pass --input_ids instead")
        # Deterministic ids spread over the vocabulary; any ids exercise the same arithmetic.
        rows = [[(7919 * (i + 1) * (n + 3)) % vocab for i in range(n)] for n in FALLBACK_LENGTHS]
        return left_pad(rows, 0, "fixed ids")
    rows = [tokenizer(p)["input_ids"] for p in (prompts or DEFAULT_PROMPTS)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return left_pad(rows, int(pad or 0), "prompts")


@dataclass
class Trace:
    """What one implementation does with a batch (float32 CPU tensors).

    ``prompt_logits`` [b, L, V]; ``tokens`` [b, steps] greedy tokens; ``step_logits`` [b, steps, V]
    the logits each token was chosen from (step 0's are the last prompt position's).
    """

    prompt_logits: torch.Tensor
    tokens: torch.Tensor
    step_logits: torch.Tensor


def runner_trace(runner: ModelRunner, batch: Batch, steps: int) -> Trace:
    """Prefill the batch, then greedy-decode ``steps`` tokens one at a time through the KV cache."""
    ids, mask = batch.ids, batch.mask
    b, length = ids.shape
    runner.allocate(b, length + steps)
    positions = positions_from_mask(mask)
    logits = runner.logits(ids, positions, mask, 0).float().cpu()
    prompt_logits, last = logits, logits[:, -1]
    next_pos = positions[:, -1:] + 1
    tokens, step_logits = [], []
    for step in range(steps):
        if step:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            last = runner.logits(tokens[-1][:, None], next_pos, mask, length + step - 1).float().cpu()[:, -1]
            next_pos = next_pos + 1
        step_logits.append(last)
        tokens.append(last.argmax(-1))
    return Trace(prompt_logits, torch.stack(tokens, 1), torch.stack(step_logits, 1))


def load_hf_model(model_dir: Path, dtype: str, device: str) -> Any:
    """transformers' own class for ``model_dir`` (no remote code), SDPA attention, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # modelc prints its own report; keep stderr for errors

    try:
        AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(
            f"{Path(model_dir) / 'config.json'}: transformers cannot load this config without remote code "
            f"({str(exc).splitlines()[0]}); verify compares with transformers' in-library classes"
        ) from None
    # Falcon's eager attention adds ALiBi twice in transformers 5.x; SDPA is the correct reference.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype), attn_implementation="sdpa")
    return model.to(device).eval()


@torch.inference_mode()
def hf_trace(model: Any, batch: Batch, steps: int) -> Trace:
    """The reference: one forward over the prompts, then ``generate(do_sample=False)``."""
    device = next(model.parameters()).device
    ids, mask = batch.ids.to(device), batch.mask.to(device)
    # Position ids as generate() derives them from the mask (left padding).
    positions = positions_from_mask(batch.mask).to(device)
    prompt_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,  # run all steps: the comparison is token by token, not until EOS
        pad_token_id=batch.pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, ids.shape[1] :].cpu()
    if tokens.shape[1] != steps:
        raise ModelcError(f"transformers generated {tokens.shape[1]} tokens, expected {steps}")
    step_logits = torch.stack([x.float().cpu() for x in out.logits], dim=1)
    return Trace(prompt_logits.float().cpu(), tokens, step_logits)


@dataclass
class Report:
    """The outcome of comparing a runner trace with the reference trace."""

    dtype: str
    tolerance: float
    logit_scale: float
    prompt_diff: float
    decode_diff: float
    agreed: int
    total: int
    #: Per prompt: the first step whose token differs, or None.
    first_divergence: list[int | None]
    #: Divergences that are not a near-tie in the reference (the two tokens' logits differ by
    #: more than twice the tolerance): (prompt, step, reference token, our token, gap).
    bad_divergences: list[tuple[int, int, int, int, float]]

    @property
    def max_diff(self) -> float:
        return max(self.prompt_diff, self.decode_diff)

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance and not self.bad_divergences

    def lines(self) -> list[str]:
        """The human-readable report, one fact per line."""
        div = ", ".join("none" if d is None else f"step {d}" for d in self.first_divergence)
        out = [
            f"max abs logit difference: {self.max_diff:.3e} (prompt {self.prompt_diff:.3e}, "
            f"decode {self.decode_diff:.3e}; |logits| up to {self.logit_scale:.3g}), "
            f"tolerance {self.tolerance:.3e} ({self.dtype})",
            f"greedy agreement: {self.agreed}/{self.total} tokens ({100.0 * self.agreed / max(self.total, 1):.1f}%), "
            f"first divergence per prompt: {div}",
        ]
        for prompt, step, ref, got, gap in self.bad_divergences:
            out.append(
                f"prompt {prompt} step {step}: reference chose token {ref}, checkpoint chose {got} "
                f"({gap:.3e} below it in the reference's logits, more than a tie)"
            )
        out.append("PASS" if self.passed else "FAIL")
        return out


def compare(ref: Trace, got: Trace, batch: Batch, dtype: str, tolerance: float | None = None) -> Report:
    """Compare two traces of the same batch; ``tolerance`` defaults to the dtype's."""
    real = batch.mask.bool()
    prompt_diff = (got.prompt_logits - ref.prompt_logits)[real].abs().max().item()
    scale = ref.prompt_logits[real].abs().max().item()
    tol = default_tolerance(dtype, scale) if tolerance is None else tolerance
    steps = ref.tokens.shape[1]
    decode_diff, agreed = 0.0, 0
    first: list[int | None] = []
    bad = []
    for row in range(ref.tokens.shape[0]):
        differ = (ref.tokens[row] != got.tokens[row]).nonzero()
        div = int(differ[0]) if len(differ) else None
        first.append(div)
        # Step s's logits depend on tokens 0..s-1 only, so they are comparable up to the divergence.
        upto = steps if div is None else div + 1
        decode_diff = max(decode_diff, (got.step_logits[row, :upto] - ref.step_logits[row, :upto]).abs().max().item())
        agreed += steps if div is None else div
        if div is not None:
            ref_tok, got_tok = int(ref.tokens[row, div]), int(got.tokens[row, div])
            gap = (ref.step_logits[row, div, ref_tok] - ref.step_logits[row, div, got_tok]).item()
            if gap > 2 * tol:
                bad.append((row, div, ref_tok, got_tok, gap))
    return Report(dtype, tol, scale, prompt_diff, decode_diff, agreed, steps * len(first), first, bad)


def verify(
    model_dir: Path,
    checkpoint_dir: Path,
    *,
    device: str = "cpu",
    prompts: list[str] | None = None,
    input_ids: list[list[int]] | None = None,
    steps: int = 32,
    tolerance: float | None = None,
    registry: Registry | None = None,
) -> tuple[Report, Batch, CheckpointConfig]:
    """Run the checkpoint and the Hugging Face model on the same batch and compare them.

    ``registry`` holds the plugins to use (default: the installed ones, loaded for this call).
    """
    from compiler_core.runtime.loading import checkpoint_runner

    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    config = read_config(Path(checkpoint_dir))
    quant = config.quantization.quant_algo
    if quant and tolerance is None:
        raise UsageError(
            f"{Path(checkpoint_dir) / 'config.json'}: quantized checkpoint (quant_algo {quant}); "
            "the dtype tolerances are for unquantized conversions, pass --tolerance"
        )
    batch = make_batch(
        Path(model_dir), Path(checkpoint_dir), int(config.model.get("vocab_size", 0)), prompts, input_ids
    )
    reference = hf_trace(load_hf_model(Path(model_dir), config.dtype, device), batch, steps)
    got = runner_trace(checkpoint_runner(Path(checkpoint_dir), device, registry), batch, steps)
    if got.prompt_logits.shape != reference.prompt_logits.shape:
        raise ModelcError(
            f"logits shapes differ: checkpoint {list(got.prompt_logits.shape)}, "
            f"transformers {list(reference.prompt_logits.shape)} (is {checkpoint_dir} converted from {model_dir}?)"
        )
    return compare(reference, got, batch, config.dtype, tolerance), batch, config
