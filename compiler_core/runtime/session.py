"""One rank of a built engine, ready to run forward passes with its own KV cache."""

from __future__ import annotations

import functools
import os
import sys
from abc import ABC, abstractmethod

import torch

from compiler_core.backends.torch.executor import GraphExecutor
from compiler_core.ir import Graph
from compiler_core.registry import Registry
from compiler_core.runtime.context import Communicator, ForwardContext, KVCache


class RankSession(ABC):
    """The runtime's view of a backend: allocate a cache, run steps, reorder beams."""

    graph: Graph
    device: torch.device
    #: True when ``forward`` accepts ``last_only=True`` (outputs for the last position only, which
    #: spares the prompt pass the lm_head over every position). Backends without it get full outputs.
    supports_last_only: bool = False
    #: True when ``forward`` accepts ``new_sequences=True``: every row's new tokens begin its
    #: sequence, unpadded (see :class:`ForwardContext`). Backends without it are not told.
    supports_new_sequences: bool = False

    @abstractmethod
    def allocate(self, batch: int, max_len: int) -> None:
        """Prepare a KV cache for ``batch`` sequences of up to ``max_len`` tokens."""

    @abstractmethod
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Run new tokens (ids, or hidden states on later pipeline stages) written at cache offset ``start``."""

    @abstractmethod
    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep cache rows ``index`` (beam search)."""

    #: True when ``forward`` accepts ``rows=range(a, b)`` (run a batch of ``b - a`` against those cache
    #: rows alone, leaving the other rows' caches as they are) and ``shift_cache`` works: what
    #: in-flight batching needs to fill some slots while the others keep decoding.
    supports_rows: bool = False

    def shift_cache(self, offset: int) -> None:
        """Move every cache row's entries ``offset`` columns (see :meth:`KVCache.shift`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot shift its KV cache")


#: Static-shape (graph) decode allocates caches in multiples of this many tokens.
GRAPH_LEN_STEP = 64
#: A static-shape session keeps a cache up to this many times longer than a run needs (see allocate).
CACHE_SLACK = 2
#: Static prompt passes are padded to a power of two of at least this many tokens (a handful of
#: graphs per row count covers every length); those of more rows x padded tokens than the maximum
#: run eagerly, where the GPU's work outweighs the host's anyway and a graph's buffers grow large.
CHUNK_MIN_WIDTH, CHUNK_MAX_TOKENS = 16, 4096


class TorchSession(RankSession):
    """A rank executed by the torch reference executor (CPU or CUDA).

    ``decode_mode`` picks how one-token steps run: ``"dynamic"`` (attention over the tokens so
    far; the default on CPU), ``"static"`` (fixed shapes: write at a device-held offset, attend
    over the whole cache under a mask) or ``"graph"`` (static, captured once per cache
    allocation as a CUDA graph and replayed; the default on CUDA, where a tensor-parallel rank's
    collectives are captured with the step when its communicator allows it). Out of
    ``"dynamic"``, prompt passes that fit run with static shapes too, padded to a power of two
    (:meth:`_static_chunk`), and under ``"graph"`` are captured at their second use.
    ``MODELC_CUDA_GRAPHS=0`` turns graphs off.
    """

    supports_last_only = True
    supports_rows = True
    supports_new_sequences = True

    def __init__(
        self,
        registry: Registry,
        graph: Graph,
        weights: dict[str, torch.Tensor],
        device: str | torch.device,
        comm: Communicator | None = None,
    ):
        self.graph = graph
        self.device = torch.device(device)
        self.executor = GraphExecutor(registry, graph, weights, self.device)
        self.comm = comm
        self.cache: KVCache | None = None
        graphs_on = os.environ.get("MODELC_CUDA_GRAPHS", "1") != "0"
        self.decode_mode = "graph" if self.device.type == "cuda" and graphs_on else "dynamic"
        self._step: _StaticStep | None = None
        #: Static prompt passes, by (whole batch?, rows, padded length, input, last position only,
        #: new sequences).
        self._chunks: dict[tuple, _StaticStep] = {}
        self._chunk_graphs_on = True
        self._pool: tuple | None = None  # the memory pool all chunk graphs share (they never overlap)

    def allocate(self, batch: int, max_len: int) -> None:
        # Static steps get lengths rounded up, so that prompts of similar lengths share one cache
        # and one captured step. A cache that already fits is kept: stale entries are never read
        # (prefill rewrites the prompt's slots, and reads stop at, or masks hide, the rest). Under
        # static shapes, one up to CACHE_SLACK times longer than needed is kept too, with its
        # captured graphs: the Triton decode attention stops at the step's offset, and on the
        # torch paths attending over the masked rest costs less than recapturing for runs that
        # alternate lengths (a 1-token and a 128-token generate of one prompt, say).
        rounded = -(-max_len // GRAPH_LEN_STEP) * GRAPH_LEN_STEP
        cache = self.cache
        longest = rounded if self.decode_mode == "dynamic" else CACHE_SLACK * rounded
        if cache is not None and cache.batch == batch and max_len <= cache.max_len <= longest:
            return
        self.cache = self.executor.allocate_cache(batch, max_len if self.decode_mode == "dynamic" else rounded)
        self._step = None  # a captured step refers to the previous cache's storage
        self._chunks.clear()

    @torch.inference_mode()
    def forward(
        self,
        x,
        positions,
        attention_mask,
        start,
        last_only: bool = False,
        rows: range | None = None,
        new_sequences: bool = False,
    ):
        x = x.to(self.device)
        capturable = self.comm is None or self.comm.graph_capturable
        static = self.decode_mode != "dynamic" and x.shape[1] == 1 and capturable
        if static and rows is None and self.cache is not None:
            return self._static_forward(x, positions, attention_mask, start)
        if self.decode_mode != "dynamic" and capturable and self.cache is not None:
            width = max(CHUNK_MIN_WIDTH, 1 << (x.shape[1] - 1).bit_length())
            whole = rows is None and x.shape[0] == self.cache.batch
            batch = x.shape[0] if rows is None else len(rows)
            fits = batch * width <= CHUNK_MAX_TOKENS and start + width <= self.cache.max_len
            if fits and (rows is not None or whole):
                return self._static_chunk(x, positions, attention_mask, start, rows, width, last_only, new_sequences)
        ctx = ForwardContext(
            positions=positions.to(self.device),
            attention_mask=attention_mask.to(self.device),
            start=start,
            cache=self.cache if rows is None or self.cache is None else self.cache.rows(rows),
            comm=self.comm,
            new_sequences=new_sequences and x.shape[1] > 1,
        )
        (out,) = self.executor.run({self.graph.inputs[0]: x}, ctx, last_only=last_only).values()
        return out

    @property
    def replays_graph(self) -> bool:
        """Whether one-token steps replay a captured CUDA graph now (the last one did, and the next will)."""
        step = self._step
        return self.decode_mode == "graph" and step is not None and step.graph is not None

    def shift_cache(self, offset: int) -> None:
        if self.cache is not None:
            self.cache.shift(offset)  # in place: a captured step keeps reading the same storage

    def reorder_cache(self, index):
        if self.cache is not None:
            rows = self.cache.batch
            self.cache.reorder(index.to(self.device))
            if index.shape[0] != rows:
                self._step = None  # the cache was reallocated, not rewritten in place
                self._chunks.clear()

    # --- static-shape decode steps (CUDA graphs) ---------------------------------------------

    def _static_forward(self, x, positions, attention_mask, start) -> torch.Tensor:
        step = self._step
        if step is None or step.x.shape != x.shape or step.x.dtype != x.dtype:
            step = self._step = _StaticStep(tuple(x.shape), x.dtype, self.cache.max_len, self.device)
        step.load(x, positions, attention_mask, start)
        if self.decode_mode != "graph":
            return self._run_static(step)
        if step.graph is None:
            try:
                step.capture(self._run_static)
            except Exception as exc:  # a plugin kernel that cannot be captured: keep decoding, eagerly
                print(
                    f"modelc: CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding without graphs",
                    file=sys.stderr,
                )
                self.decode_mode = "static"
                return self._run_static(step)
        step.graph.replay()
        return step.out.clone()

    def _run_static(
        self, step: _StaticStep, last_only: bool = False, by_rows: bool = False, new_sequences: bool = False
    ) -> torch.Tensor:
        """One static forward of ``step``'s buffers: a decode step of every row, or a prompt pass
        (of ``step.rows`` when ``by_rows``; ``last_only`` keeps its last real position;
        ``new_sequences`` as in :class:`ForwardContext`)."""
        ctx = ForwardContext(
            positions=step.positions,
            attention_mask=step.mask,
            cache=self.cache,
            comm=self.comm,
            start_index=step.start,
            row_index=step.rows if by_rows else None,
            last_index=step.last,
            new_sequences=new_sequences,
        )
        (out,) = self.executor.run({self.graph.inputs[0]: step.x}, ctx, last_only=last_only).values()
        return out

    # --- static-shape prompt passes (a whole batch's, or a chunk of some rows) ----------------

    def _static_chunk(
        self, x, positions, attention_mask, start, rows: range | None, width: int, last_only: bool, new_sequences: bool
    ):
        """A prompt pass of every row (``rows`` None) or of cache rows ``rows`` (in-flight
        batching), padded to ``width`` tokens and run with static shapes: from its second use on,
        replayed as a CUDA graph per (rows, width), so the pass costs the GPU's time rather than
        the host's (an eager 128-token chunk of falcon-7b took ~29 ms of host time for ~6 ms of GPU
        work on an H200). A shape seen once runs without capturing (a one-off prompt would pay
        three runs for it). The padding writes K/V past the pass in its own rows, where the next
        chunk or decode step writes before anything reads."""
        batch = x.shape[0] if rows is None else len(rows)
        key = (rows is None, batch, width, x.dtype, tuple(x.shape[2:]), last_only, new_sequences)
        step = self._chunks.get(key)
        if step is None:
            step = self._chunks[key] = _StaticStep(
                (batch, width, *x.shape[2:]), x.dtype, self.cache.max_len, self.device
            )
        n = x.shape[1]
        step.load(x, positions, attention_mask, start, rows)
        step.uses += 1
        run = functools.partial(
            self._run_static, last_only=last_only, by_rows=rows is not None, new_sequences=new_sequences
        )
        if self.decode_mode == "graph" and self._chunk_graphs_on and step.graph is None and step.uses > 1:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                step.capture(run, self._pool)
            except Exception as exc:  # a kernel that cannot be captured: chunks run eagerly from now on
                print(
                    f"modelc: CUDA graph capture of a prompt chunk failed ({type(exc).__name__}: {exc}); "
                    "running prompt chunks without graphs",
                    file=sys.stderr,
                )
                self._chunk_graphs_on = False
        if step.graph is not None:
            step.graph.replay()
            out = step.out
        else:
            out = run(step)
        return out.clone() if last_only else out[:, :n].clone()


class _StaticStep:
    """Fixed input buffers of a static forward and, once captured, its CUDA graph: a one-token
    decode step of every row, or a prompt pass (of every row, or of ``rows``) padded to a fixed
    length, its last real position at ``last``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, max_len: int, device: torch.device) -> None:
        batch, width = shape[:2]
        self.x = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros((batch, width), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, max_len), dtype=torch.long, device=device)
        self.start = torch.zeros((1,), dtype=torch.long, device=device)
        self.rows = torch.zeros((batch,), dtype=torch.long, device=device)
        self.last = torch.zeros((1,), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.uses = 0

    def load(self, x, positions, attention_mask, start: int, rows: range | None = None) -> None:
        n = x.shape[1]
        self.x[:, :n].copy_(x)
        self.positions[:, :n].copy_(positions)
        if n < self.x.shape[1]:  # padding: its outputs are never read, its K/V overwritten before use
            self.x[:, n:].zero_()
            self.positions[:, n:].copy_(positions[:, -1:])
        # Slots after the new tokens stay masked: the cache holds nothing valid there yet.
        self.mask[:, : start + n].copy_(attention_mask)
        self.mask[:, start + n :].zero_()
        self.start.fill_(start)
        if rows is not None:
            self.rows.copy_(torch.arange(rows.start, rows.stop, device=self.rows.device))
        if self.x.shape[1] > 1:  # a prompt pass (a decode step's one position is its last)
            self.last.fill_(n - 1)

    def capture(self, run, pool: tuple | None = None) -> None:
        # Warm-up runs on a side stream (as torch.cuda.graph requires) write the same K/V at the
        # same offset as the replay will, so they leave the cache as the step itself does.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run(self)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.out = run(self)
        self.graph = graph
