"""Batched generation over any :class:`ModelRunner`: greedy, sampling and beam search.

Prompts of different lengths run as one left-padded batch. The KV cache is allocated once for
``batch * beams`` rows of ``prompt_len + max_new_tokens`` tokens; the prompt is one forward
pass (prefill) and every later step feeds one token per row at cache offset ``start``.
Positions count real tokens only (``positions_from_mask``), so rotary and ALiBi see the same
positions as an unpadded run. Beam search follows transformers' ``_beam_search`` step for step
(same candidate counts, masking constants, length penalty and early-stopping heuristic), so its
beams equal ``model.generate(num_beams=B, do_sample=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compiler_core.errors import UsageError
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.runner import ModelRunner

#: Seed used when none is given, so that every rank of a multi-rank run draws the same tokens.
DEFAULT_SEED = 0
#: transformers' "impossible score" offset for finished / exhausted beam candidates.
_NEG = -1.0e9


@dataclass
class GenerationConfig:
    """How to continue the prompts.

    ``do_sample=None`` samples when temperature, top-k or top-p change the distribution
    (temperature != 1, top_k > 1 or 0 < top_p < 1); temperature 0 is always greedy.
    ``top_p`` of 0 or 1 disables nucleus filtering (TensorRT-LLM passes 0 for "off").
    ``end_id`` stops a sequence after it is generated, as does any of ``end_ids`` (a model with
    several stop tokens, such as Llama 3's three); ``pad_id`` fills the left padding of shorter
    prompts (default: the first stop token, else 0). ``length_penalty`` and ``early_stopping``
    have transformers' beam-search meaning.
    """

    max_new_tokens: int
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    end_ids: tuple[int, ...] = ()
    do_sample: bool | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max_output_len must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UsageError(f"--num_beams must be at least 1, got {self.num_beams}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise UsageError(f"--top_p must be in [0, 1], got {self.top_p}")
        if self.early_stopping not in (True, False, "never"):
            raise UsageError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.sampling:
            raise UsageError("--num_beams > 1 runs deterministic beam search; drop --temperature/--top_k/--top_p")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends a sequence: ``end_id`` first, then ``end_ids``, without repeats."""
        first = () if self.end_id is None else (self.end_id,)
        return tuple(dict.fromkeys((*first, *self.end_ids)))

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random rather than taken by argmax."""
        if self.temperature == 0:
            return False
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature != 1.0 or self.top_k > 1 or 0.0 < self.top_p < 1.0


def check_limits(
    limits: dict[str, Any] | None, batch: int, prompt_len: int, max_new_tokens: int, source: str = "engine"
) -> None:
    """Raise UsageError when a request exceeds an engine's build limits (max_batch_size, ...)."""
    if not limits:
        return
    max_batch, max_input, max_seq = (limits.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len"))
    if max_batch is not None and batch > max_batch:
        raise UsageError(
            f"{batch} prompts exceed the {source}'s max_batch_size {max_batch} (rebuild with --max_batch_size)"
        )
    if max_input is not None and prompt_len > max_input:
        raise UsageError(
            f"a prompt of {prompt_len} tokens exceeds the {source}'s max_input_len {max_input} "
            "(rebuild with --max_input_len)"
        )
    if max_seq is not None and prompt_len + max_new_tokens > max_seq:
        raise UsageError(
            f"prompt {prompt_len} + --max_output_len {max_new_tokens} tokens exceed the {source}'s max_seq_len "
            f"{max_seq} (rebuild with --max_seq_len or lower --max_output_len)"
        )


def generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    config: GenerationConfig,
    max_seq_len: int | None = None,
) -> list[list[list[int]]]:
    """Continue every prompt; return, per prompt and per beam (best first), the new token ids.

    Returned sequences hold generated tokens only: a sequence that produced a stop token ends
    with it (nothing after), others have ``max_new_tokens`` tokens. ``max_seq_len`` caps
    prompt + new tokens (as do the runner's ``build_limits``, when it has them).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    check_limits(getattr(runner, "build_limits", None), batch, prompt_len, config.max_new_tokens)
    if max_seq_len is not None:
        check_limits({"max_seq_len": max_seq_len}, batch, prompt_len, config.max_new_tokens, "run")
    with torch.inference_mode():
        if config.num_beams > 1:
            return _beam_search(runner, prompts, config)
        return [[seq] for seq in _greedy_or_sample(runner, prompts, config)]


# --- shared pieces ---------------------------------------------------------------------------


class PromptBatch:
    """Left-padded ids, the full-length attention mask and each row's real prompt length: what
    every generation mode feeds a runner, a prompt pass and then one decode step at a time."""

    def __init__(self, prompts: list[list[int]], rows_per_prompt: int, total: int, pad_id: int, device: torch.device):
        prompt_len = max(len(p) for p in prompts)
        ids = [[pad_id] * (prompt_len - len(p)) + list(p) for p in prompts for _ in range(rows_per_prompt)]
        self.prompt_len = prompt_len
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        rows = self.ids.shape[0]
        # The mask covers the whole cache once; step t reads its first prompt_len + t + 1 columns.
        self.mask = torch.ones((rows, total), dtype=torch.long, device=device)
        lengths = torch.tensor([len(p) for p in prompts for _ in range(rows_per_prompt)], device=device)
        self.mask[:, :prompt_len] = (torch.arange(prompt_len, device=device)[None] >= prompt_len - lengths[:, None]).to(
            torch.long
        )
        self.real_len = lengths
        self.padded = len({len(p) for p in prompts}) > 1

    def prefill(self, runner: ModelRunner) -> torch.Tensor:
        """Run the prompts; the next-token logits [rows, vocab] in float32."""
        mask = self.mask[:, : self.prompt_len]
        fresh = not self.padded
        return runner.last_logits(self.ids, positions_from_mask(mask), mask, 0, new_sequences=fresh).float()

    def step(self, runner: ModelRunner, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed generated token ``t`` (0-based) of every row; the next-token logits in float32."""
        start = self.prompt_len + t
        positions = (self.real_len + t)[:, None]
        return runner.last_logits(tokens[:, None], positions, self.mask[:, : start + 1], start).float()


def _pad_id(config: GenerationConfig) -> int:
    if config.pad_id is not None:
        return config.pad_id
    return config.stop_ids[0] if config.stop_ids else 0


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in transformers' order and with its tie rules (``config`` needs
    only ``temperature``, ``top_k`` and ``top_p``)."""
    logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - config.top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def trim_after_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """Cut a sequence after its first stop token (kept)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


# --- greedy and sampling ---------------------------------------------------------------------


def _greedy_or_sample(runner: ModelRunner, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    n_new, stop_ids, pad_id = config.max_new_tokens, config.stop_ids, _pad_id(config)
    device = runner.device
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    batch = PromptBatch(prompts, 1, max(len(p) for p in prompts) + n_new, pad_id, device)
    runner.allocate(len(prompts), batch.mask.shape[1])
    generator = None
    if config.sampling:
        generator = torch.Generator(device=device)
        generator.manual_seed(DEFAULT_SEED if config.seed is None else config.seed)
    out = torch.full((len(prompts), n_new), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = batch.prefill(runner)
    steps = 0
    for t in range(n_new):
        if generator is None:
            tokens = logits.argmax(-1)
        else:
            probs = filter_logits(logits, config).softmax(-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        # Finished rows keep running (the batch shape is fixed) but emit padding, as transformers does.
        tokens = tokens.masked_fill(done, pad_id)
        out[:, t] = tokens
        steps = t + 1
        if stop_ids:
            done |= torch.isin(tokens, stop)
            if bool(done.all()):
                break
        if t + 1 < n_new:
            logits = batch.step(runner, tokens, t)
    return [trim_after_stop(row, stop_ids) for row in out[:, :steps].tolist()]


# --- beam search -----------------------------------------------------------------------------


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select beams ``index`` [batch, k] along dim 1 of ``x`` [batch, beams, ...]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def _beam_search(runner: ModelRunner, prompts: list[list[int]], config: GenerationConfig) -> list[list[list[int]]]:
    """transformers' vectorised beam search over generated tokens (the prompt is not tracked).

    Each step keeps the top max(2, 1 + stop tokens)·B continuations of all beams; the best B that did not just end
    continue running, while those among the top B that end (a stop token, or the length limit) compete
    for the B finished slots with score ``sum(logprobs) / generated_len ** length_penalty``.
    """
    n_beams, n_new, stop_ids = config.num_beams, config.max_new_tokens, config.stop_ids
    lp, early = config.length_penalty, config.early_stopping
    n_batch, device = len(prompts), runner.device
    # Finished hypotheses end at a stop token (the fill after it is trimmed) or are max_new_tokens long.
    fill = _pad_id(config)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    batch = PromptBatch(prompts, n_beams, max(len(p) for p in prompts) + n_new, fill, device)
    runner.allocate(n_batch * n_beams, batch.mask.shape[1])

    keep = max(2, 1 + len(stop_ids)) * n_beams  # transformers' candidate count
    top_mask = torch.arange(keep, device=device) < n_beams
    running = torch.full((n_batch, n_beams, n_new), fill, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros((n_batch, n_beams), dtype=torch.float32, device=device)
    running_scores[:, 1:] = _NEG  # only the first beam's tokens count at step 0 (all beams are equal)
    finished_scores = torch.full((n_batch, n_beams), _NEG, dtype=torch.float32, device=device)
    is_finished = torch.zeros((n_batch, n_beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((n_batch, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(n_batch, device=device)[:, None] * n_beams

    logits = batch.prefill(runner)
    for t in range(n_new):
        vocab = logits.shape[-1]
        log_probs = logits.log_softmax(-1).view(n_batch, n_beams, vocab) + running_scores[:, :, None]
        top_scores, top_index = torch.topk(log_probs.view(n_batch, -1), k=keep)
        source_beam, top_tokens = top_index // vocab, top_index % vocab
        top_seqs = _gather(running, source_beam)
        top_seqs[:, :, t] = top_tokens
        ends = torch.full_like(top_tokens, t + 1 >= n_new, dtype=torch.bool)
        if stop_ids:
            ends |= torch.isin(top_tokens, stop)

        # Beams that continue: the best `n_beams` candidates that did not just end.
        running_candidates = top_scores + ends.float() * _NEG
        next_index = torch.topk(running_candidates, k=n_beams).indices
        running = _gather(top_seqs, next_index)
        running_scores = _gather(running_candidates, next_index)
        running_source = _gather(source_beam, next_index)

        # Finished hypotheses: only the top `n_beams` candidates may end; keep the best `n_beams`.
        just_ended = ends & top_mask[None, :]
        ended_scores = top_scores / ((t + 1) ** lp)
        if early is True:
            ended_scores = ended_scores + (is_finished.all(-1, keepdim=True)).float() * _NEG
        ended_scores = ended_scores + (~can_improve).float() * _NEG
        ended_scores = ended_scores + (~just_ended).float() * _NEG
        merged_scores = torch.cat((finished_scores, ended_scores), dim=1)
        best = torch.topk(merged_scores, k=n_beams).indices
        finished = _gather(torch.cat((finished, top_seqs), dim=1), best)
        finished_scores = _gather(merged_scores, best)
        is_finished = _gather(torch.cat((is_finished, just_ended), dim=1), best)

        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        best_len = (n_new if early == "never" and lp > 0 else t + 1) ** lp
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve &= (running_scores[:, :1] / best_len > worst).any(-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early is True)
        if not (bool(can_improve.any()) and open_beams and not bool(ends.all())):
            break
        runner.reorder_cache((running_source + batch_offset).view(-1))
        logits = batch.step(runner, running[:, :, t].reshape(-1), t)

    return [[trim_after_stop(seq, stop_ids) for seq in beams] for beams in finished.tolist()]
