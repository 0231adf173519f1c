"""In-flight batching: a bounded queue of sequences, one cache slot each, stepped together.

The engine thread repeats one iteration: drop cancelled sequences, admit waiting ones into free
slots, run one prefill chunk of every sequence still filling its slot, then one decode step of
every sequence that is generating. A sequence leaves its slot the moment it finishes or is
cancelled, and a newcomer takes it at the next iteration, so a long generation never holds up a
short one.

**Placement.** Slots are static (one cache row per sequence, allocated once for
``max_batch_size`` rows): the decode step keeps the one fixed shape that a captured CUDA graph
replays, and no page table has to reach the kernels. Rows share the column cursor of
:mod:`compiler_core.serve.slots`; a newcomer of ``L`` prompt tokens prefilled in ``k`` chunks
joins the decode steps ``k - 1`` iterations later, so its region is placed to end at that
column. When it would not fit (it would start before column 0, or run past the last column),
every row is shifted by the same offset so that the leftmost region starts at column 0. The
cache is ``2 * max_seq_len`` columns wide, which makes every admission fit after that shift: the
oldest region then starts at 0, so the cursor is at most ``max_seq_len``, and no sequence needs
more than ``max_seq_len`` columns past its start.

**Chunked prefill.** A prompt is written in chunks of at most ``prefill_chunk`` tokens, one chunk
per iteration, between the decode steps of the others; sequences are admitted into prefill
while their chunks fit the same per-iteration budget, so a newcomer never stalls the running
sequences for more than one chunk's worth of work per step. The decode step also runs the rows
still prefilling (its shape is fixed), writing an unread entry at the cursor column of each; the
cursor only reaches the last ``k - 1`` columns of a filling region, so the last chunk, written
after all those steps, is made at least ``k - 1`` tokens long and overwrites them.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compiler_core.runtime.generation import GenerationConfig, filter_logits
from compiler_core.serve.slots import SlotRunner


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence continues: token budget, sampling filters, stop ids and logprobs."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    #: How many alternatives each token's logprob comes with; None: no logprobs at all.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Token:
    """One generated token, with its logprob and the top alternatives when they were asked for."""

    id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a sequence: ``stop`` (a stop token), ``length`` (max_tokens), ``abort`` (shutdown),
    ``cancelled`` (the client went away) or ``error`` (the engine failed)."""

    reason: str


class _State(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    """One prompt's continuation; ``sink`` receives each :class:`Token` and then one :class:`Finished`,
    on the engine thread."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Token | Finished], None]
    cancelled: bool = False
    generated: int = 0
    state: _State = _State.WAITING
    row: int = -1
    region_start: int = 0
    chunks: list[int] = field(default_factory=list)
    filled: int = 0
    #: The sequences admitted with this one into consecutive rows, prefilled together.
    group: list[Sequence] = field(default_factory=list)
    last_token: int = 0
    #: Decode steps queued for this sequence whose token the host has not read yet (0 or 1).
    in_flight: int = 0
    generator: torch.Generator | None = None

    @property
    def end(self) -> int:
        """One past the last cache column this sequence may write."""
        return self.region_start + len(self.prompt) + self.params.max_tokens


@dataclass
class _QueuedStep:
    """Tokens chosen on the device for ``rows``, on their way to the host: a decode step's (indexed
    by cache row) or a prompt pass's first tokens (indexed by row - ``first_row``)."""

    rows: list[Sequence]
    host: torch.Tensor
    ready: torch.cuda.Event | None
    first_row: int = 0

    @classmethod
    def of(cls, rows: list[Sequence], tokens: torch.Tensor, first_row: int = 0) -> _QueuedStep:
        if tokens.device.type != "cuda":
            return cls(rows, tokens, None, first_row)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(rows, host, ready, first_row)

    def host_tokens(self) -> list[int]:
        """The tokens by position (the GPU's work up to them done first)."""
        if self.ready is not None:
            self.ready.synchronize()  # waits with the GIL released, so the other threads run meanwhile
        return self.host.tolist()


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` sequences already."""


class NotAccepting(Exception):
    """The scheduler is shutting down (or its engine failed) and takes no new sequences."""


def chunk_sizes(prompt_len: int, chunk: int) -> list[int]:
    """Prefill chunks of a prompt: the remainder first, then full chunks, each at least as long as
    there are chunks (see the module docstring; a chunk grows past ``chunk`` only for prompts
    longer than ``chunk ** 2``)."""
    chunk = max(chunk, math.isqrt(prompt_len) + 1)
    count = -(-prompt_len // chunk)
    return [prompt_len - (count - 1) * chunk] + [chunk] * (count - 1)


class Scheduler:
    """Admits, steps and retires :class:`Sequence` objects on a :class:`SlotRunner` from one engine thread."""

    def __init__(self, slots: SlotRunner, max_seq_len: int, prefill_chunk: int, max_queue: int) -> None:
        if slots.width < 2 * max_seq_len:
            raise ValueError(f"{slots.width} cache columns cannot place every sequence of up to {max_seq_len}")
        self.slots = slots
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self._rows: list[Sequence | None] = [None] * slots.rows
        self._cursor = 0
        self._generated = 0
        self._iterations = 0
        self._busy_s = 0.0
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._accepting = True
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="modelc-engine", daemon=True)
        self._step_hooks: tuple[Callable[[], None], ...] = ()
        #: Set by cancel(): the next iteration looks for cancelled rows (no scan of every row each step).
        self._cancel_pending = False
        #: The decode step queued on the device whose tokens the host reads after queueing the next one.
        self._queued: _QueuedStep | None = None
        #: Prompt passes of this iteration whose first tokens stay on the device until the decode step is queued.
        self._prefilled: list[_QueuedStep] = []
        #: Per cache row, the last token chosen on the device (the input of a row whose token is in flight).
        self._feed: torch.Tensor | None = None
        self.failure: BaseException | None = None
        # The engine thread must run on the runner's GPU; "cuda" without an index means the device
        # current here, at construction, since a new thread starts on GPU 0.
        device = slots.device
        self._cuda_index: int | None = None
        if device.type == "cuda":
            self._cuda_index = torch.cuda.current_device() if device.index is None else device.index

    # --- the HTTP side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on the engine thread after every iteration, and once more after the last
        events at shutdown: a consumer whose sinks only collect events hands them on from there,
        once per iteration for all sequences instead of once per token."""
        self._step_hooks = (*self._step_hooks, hook)  # one assignment: the engine thread reads it unlocked

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue ``sequences`` (all or none); raises QueueFull or NotAccepting."""
        with self._wake:
            if not self._accepting:
                raise NotAccepting("the server is shutting down" if self.failure is None else "the engine failed")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting already (--max_queue {self.max_queue})")
            self._waiting.extend(sequences)
            self._wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Free the slots of ``sequences`` at the next iteration (a client went away)."""
        with self._wake:
            for seq in sequences:
                seq.cancelled = True
            self._cancel_pending = True  # after the flags: the engine clears this before it scans them
            self._wake.notify()

    def drain(self, timeout: float) -> None:
        """Take no new sequences; finish the queued and running ones, aborting what is left after ``timeout`` s."""
        with self._wake:
            self._accepting = False
            deadline = time.monotonic() + timeout
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._wake.notify()

    def join(self) -> None:
        """Wait for the engine thread, which ends once drained (at once if it never started)."""
        if self._thread.ident is not None:
            self._thread.join()

    @property
    def accepting(self) -> bool:
        """False once draining (or failed): new requests are refused."""
        return self._accepting

    def stats(self) -> dict[str, int | float]:
        """Slots in use, sequences waiting, tokens generated so far, the engine thread's iterations
        and the seconds it spent in them (not waiting for work), and decode steps run (all, and those
        that replayed a captured CUDA graph) (for /health: a benchmark tells from two readings how
        busy the engine was)."""
        busy = sum(seq is not None for seq in self._rows)
        return {
            "slots": len(self._rows),
            "busy": busy,
            "waiting": len(self._waiting),
            "generated": self._generated,
            "iterations": self._iterations,
            "busy_s": round(self._busy_s, 6),
            "decode_steps": self.slots.decode_steps,
            "graph_steps": self.slots.graph_steps,
        }

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._cuda_index is not None:
                # CUDA graph capture works on the current device's streams.
                torch.cuda.set_device(self._cuda_index)
            while self._wait_for_work():
                start = time.perf_counter()
                self.step()
                self._busy_s += time.perf_counter() - start
                self._iterations += 1
                for hook in self._step_hooks:
                    hook()
        except BaseException as exc:
            self.failure = exc
            print(f"modelc: error: the engine failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            with self._wake:
                self._accepting = False
            self._end_all(Finished("error"))
        else:
            self._collect()
            self._end_all(Finished("abort"))
        for hook in self._step_hooks:
            hook()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when the engine should stop."""
        with self._wake:
            while True:
                active = any(seq is not None for seq in self._rows)
                if self._deadline is not None and (time.monotonic() >= self._deadline or not (active or self._waiting)):
                    return False
                if active or self._waiting:
                    return True
                self._wake.wait(None if self._deadline is None else max(0.0, self._deadline - time.monotonic()))

    def _end_all(self, finished: Finished) -> None:
        with self._wake:
            remaining = [seq for seq in self._rows if seq is not None] + list(self._waiting)
            self._waiting.clear()
        for seq in remaining:
            self._retire(seq, finished)

    def step(self) -> None:
        """One iteration: retire cancelled sequences, admit, one prefill chunk each, one decode step.

        The engine thread's loop body (it calls the step hooks after it); tests drive it directly to
        control when requests arrive."""
        if self._cancel_pending:
            self._cancel_pending = False
            for seq in self._rows:
                if seq is not None and seq.cancelled:
                    self._retire(seq, Finished("cancelled"))
        if self._waiting:  # read unlocked: a sequence queued just now is admitted next iteration
            self._admit()
        groups = self._prefill_groups()
        for group in groups:
            self._prefill_chunk(group)
        decoding = [s for s in self._rows if s is not None and s.state is _State.DECODE]
        stepped = self._decode(decoding) if decoding or self._queued is not None else False
        if groups or stepped:
            self._cursor += 1

    def _prefill_groups(self) -> list[list[Sequence]]:
        groups = {id(s.group): s.group for s in self._rows if s is not None and s.state is _State.PREFILL}
        return list(groups.values())

    def _admit(self) -> None:
        """Move waiting sequences into free slots. Consecutive sequences with prompts of one length go
        into consecutive rows as one group, prefilled by one forward pass; while others are decoding,
        only as many as the per-step prefill budget allows (none of it is needed when nobody waits
        on a decode step)."""
        decoding = any(s is not None and s.state is _State.DECODE for s in self._rows)
        used = sum(len(g) * max(g[0].chunks) for g in self._prefill_groups())
        while True:
            with self._wake:
                while self._waiting and self._waiting[0].cancelled:
                    self._retire(self._waiting.popleft(), Finished("cancelled"))
                first_row, free = self._free_run()
                if not self._waiting or not free:
                    return
                length = len(self._waiting[0].prompt)
                chunks = chunk_sizes(length, self.prefill_chunk)
                take = free
                if decoding:
                    take = min(free, (self.prefill_chunk - used) // max(chunks))
                    if used == 0:
                        take = max(take, 1)  # a prompt whose chunks outgrow the budget still gets in
                group: list[Sequence] = []
                while self._waiting and len(group) < take:
                    head = self._waiting[0]
                    if head.cancelled or len(head.prompt) != length:
                        break
                    group.append(self._waiting.popleft())
            if not group:
                return
            used += len(group) * max(chunks)
            self._place(group, first_row, chunks)

    def _free_run(self) -> tuple[int, int]:
        """(first row, length) of the longest run of consecutive free rows ((0, 0) when none is free)."""
        best, run_start = (0, 0), None
        for row, seq in enumerate([*self._rows, object()]):
            if seq is None:
                run_start = row if run_start is None else run_start
            elif run_start is not None:
                best = max(best, (run_start, row - run_start), key=lambda r: r[1])
                run_start = None
        return best

    def _place(self, group: list[Sequence], first_row: int, chunks: list[int]) -> None:
        active = [s for s in self._rows if s is not None]
        region_start = self._cursor + len(chunks) - 1 - len(group[0].prompt)
        for i, seq in enumerate(group):
            seq.row, seq.chunks, seq.state, seq.group = first_row + i, list(chunks), _State.PREFILL, group
            seq.region_start = region_start
        placed = [*active, *group]
        if min(s.region_start for s in placed) < 0 or max(s.end for s in placed) > self.slots.width:
            offset = -min(s.region_start for s in placed)
            if active:
                self.slots.shift(offset)
            self._cursor += offset
            for s in placed:
                s.region_start += offset
        if min(s.region_start for s in placed) < 0 or max(s.end for s in placed) > self.slots.width:
            raise RuntimeError(f"cannot place sequences of {len(group[0].prompt)} prompt tokens")
        for seq in group:
            if not seq.params.greedy:
                seq.generator = torch.Generator(device=self.slots.device)
                seed = seq.params.seed
                seq.generator.manual_seed(random.SystemRandom().getrandbits(63) if seed is None else seed)
            self._rows[seq.row] = seq

    def _prefill_chunk(self, group: list[Sequence]) -> None:
        """The next chunk of every sequence of ``group`` (one forward per run of consecutive rows)."""
        size, filled, region_start = group[0].chunks[0], group[0].filled, group[0].region_start
        runs: list[list[Sequence]] = []
        for seq in group:  # a member cancelled mid-prefill leaves a gap
            if runs and runs[-1][-1].row + 1 == seq.row:
                runs[-1].append(seq)
            else:
                runs.append([seq])
        for run in runs:
            ids = [s.prompt[filled : filled + size] for s in run]
            rows = range(run[0].row, run[-1].row + 1)
            logits = self.slots.prefill(rows, ids, region_start, region_start + filled)
            for seq in run:
                seq.chunks.pop(0)
                seq.filled += size
            if run[0].chunks:  # one group's members share their chunks: all of them go on, or none
                continue
            for seq in run:
                seq.state = _State.DECODE
            if self._pipelines(run):
                # The first tokens stay on the device: this iteration's decode step takes them
                # from there, queued behind this pass, and the host reads them after queueing it.
                first = logits.argmax(-1)
                self._device_feed()[rows.start : rows.stop] = first
                for seq in run:
                    seq.in_flight += 1
                self._prefilled.append(_QueuedStep.of(run, first, rows.start))
            else:
                for i, seq in enumerate(run):
                    self._emit(seq, logits[i], None)

    def _pipelines(self, sequences: list[Sequence]) -> bool:
        """Whether the tokens of ``sequences`` may stay on the device: greedy, without logprobs, on
        a runner whose decode step takes device tokens."""
        return self.slots.takes_device_tokens and all(s.params.greedy and s.params.logprobs is None for s in sequences)

    def _device_feed(self) -> torch.Tensor:
        if self._feed is None:
            self._feed = torch.zeros(len(self._rows), dtype=torch.long, device=self.slots.device)
        return self._feed

    def _decode(self, decoding: list[Sequence]) -> bool:
        """One decode step of ``decoding``; True if a step ran.

        Greedy steps without logprobs on a runner that takes device tokens are pipelined: the step
        is fed the previous step's tokens (or a prompt pass's first token) where they are still on
        the device and queued before the host reads those (:meth:`_collect`), so the host's work per
        step overlaps the GPU's. A row whose queued token turns out to be a stop token has run one
        step for nothing, into its own region; one that will have reached ``max_tokens`` is not
        queued again.
        """
        pipelined = self._pipelines(decoding)
        if not pipelined:
            self._collect()
            decoding = [s for s in decoding if s.state is _State.DECODE]
        stepping = [s for s in decoding if s.generated + s.in_flight < s.params.max_tokens]
        if not stepping:
            self._collect()
            return False
        tokens: list[int | None] = [None] * len(self._rows)
        starts: list[int | None] = [None] * len(self._rows)
        for seq in stepping:
            tokens[seq.row], starts[seq.row] = seq.last_token, seq.region_start
        if not pipelined:
            logits = self.slots.decode(tokens, starts, self._cursor)
            greedy = logits.argmax(-1).tolist() if any(s.params.greedy for s in stepping) else None
            for seq in stepping:
                self._emit(seq, logits[seq.row], None if greedy is None else greedy[seq.row])
            return True
        # -1 (no token id) marks the rows whose input is a token still on the device.
        ids = [self.slots.pad_id if t is None else t for t in tokens]
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.in_flight:
                ids[row] = -1
        fed = self.slots.to_device(ids)
        fed = torch.where(fed < 0, self._device_feed(), fed)
        next_tokens = self.slots.decode(fed, starts, self._cursor).argmax(-1)
        for seq in stepping:
            seq.in_flight += 1
        queued, self._queued = self._queued, _QueuedStep.of(stepping, next_tokens)
        # Rows that join later write their first token into this tensor, after the copy to the host.
        self._feed = next_tokens
        self._read_prefilled()
        if queued is not None:
            self._read(queued)
        return True

    def _collect(self) -> None:
        """Read the tokens still on their way (prompt passes' first ones, then the queued decode
        step's) and hand them on."""
        self._read_prefilled()
        if self._queued is not None:
            queued, self._queued = self._queued, None
            self._read(queued)

    def _read_prefilled(self) -> None:
        prefilled, self._prefilled = self._prefilled, []
        for step in prefilled:
            self._read(step)

    def _read(self, queued: _QueuedStep) -> None:
        tokens = queued.host_tokens()
        for seq in queued.rows:
            seq.in_flight -= 1
            if seq.state is _State.DECODE:  # not retired meanwhile (cancelled, or a stop before)
                self._emit(seq, None, tokens[seq.row - queued.first_row])

    def _emit(self, seq: Sequence, logits: torch.Tensor | None, argmax: int | None) -> None:
        """Pick the next token of ``seq`` from its ``logits`` [vocab] (or take ``argmax``, for a greedy
        sequence without logprobs), hand it on, retire ``seq`` when done."""
        params = seq.params
        if params.greedy:
            token = argmax if argmax is not None else int(logits.argmax())
        else:
            config = GenerationConfig(
                max_new_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
            )
            probs = filter_logits(logits[None], config).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        out = Token(token)
        if params.logprobs is not None:
            logprobs = logits.log_softmax(-1)
            top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
            alternatives = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out = Token(token, float(logprobs[token]), alternatives)
        seq.last_token = token
        seq.generated += 1
        self._generated += 1
        seq.sink(out)
        if token in params.stop_ids:
            self._retire(seq, Finished("stop"))
        elif seq.generated >= params.max_tokens:
            self._retire(seq, Finished("length"))

    def _retire(self, seq: Sequence, finished: Finished) -> None:
        if seq.state is _State.DONE:
            return
        if seq.state is _State.PREFILL:
            seq.group.remove(seq)
        if seq.state in (_State.PREFILL, _State.DECODE):
            self._rows[seq.row] = None
        seq.state = _State.DONE
        seq.sink(finished)
