"""The forward passes of a continuously batched run: one KV-cache row (slot) per sequence.

All rows share one column cursor: every decode step writes each row's next token at the same
cache column, so the step has the fixed shape a captured CUDA graph needs and runs through the
runner's ordinary batched path. A sequence occupies the columns ``[region_start, cursor]`` of its
row; its prompt is placed so that it ends where the sequence joins the decode steps, and the
columns before it are masked, exactly as left padding is. :class:`SlotRunner` only executes;
where regions go is the scheduler's business (see scheduler.py).
"""

from __future__ import annotations

import torch

from compiler_core.runtime.runner import ModelRunner


class SlotRunner:
    """Prefill chunks, decode steps and cache shifts over ``rows`` slots of ``width`` columns."""

    #: Whether :meth:`decode` may be fed the previous step's tokens as a device tensor, so that the
    #: scheduler can queue a step before it has read the last one's tokens on the host.
    takes_device_tokens = True

    def __init__(self, runner: ModelRunner, rows: int, width: int, pad_id: int) -> None:
        self.runner = runner
        self.rows = rows
        self.width = width
        self.pad_id = pad_id
        self.device = runner.device
        runner.allocate(rows, width)
        self._columns = torch.arange(width, device=self.device)
        #: Decode steps run, and those of them that replayed a captured CUDA graph on every rank
        #: session here (shown by /health, so that a benchmark can tell graphs were used).
        self.decode_steps = 0
        self.graph_steps = 0
        self._sessions = list(getattr(runner, "sessions", ()))

    @torch.inference_mode()
    def prefill(self, rows: range, ids: list[list[int]], region_start: int, start: int) -> torch.Tensor:
        """Write ``ids[i]`` at columns ``[start, start + len)`` of row ``rows[i]`` (the rows consecutive, the
        chunks of one length), each row's sequence beginning at column ``region_start``; return the
        float32 logits [len(rows), vocab] after the last of them."""
        end = start + len(ids[0])
        tokens = self.to_device(ids)
        mask = (self._columns[:end] >= region_start).long()[None].expand(len(rows), -1)
        positions = torch.arange(start - region_start, end - region_start, device=self.device)[None]
        fresh = start == region_start  # the first chunk: nothing before it in the row is attended
        logits = self.runner.row_logits(rows, tokens, positions.expand(len(rows), -1), mask, start, fresh)
        return logits.float()

    @torch.inference_mode()
    def decode(
        self, tokens: list[int | None] | torch.Tensor, region_starts: list[int | None], cursor: int
    ) -> torch.Tensor:
        """One step of every row at column ``cursor``: row ``r`` feeds ``tokens[r]`` as the token after
        its region ``[region_starts[r], cursor)``; rows given None run padding that nobody reads.
        ``tokens`` may also be a device tensor [rows] (see :attr:`takes_device_tokens`).
        Returns the float32 logits [rows, vocab]."""
        if isinstance(tokens, torch.Tensor):
            ids = tokens[:, None]
        else:
            ids = self.to_device([[self.pad_id if t is None else t] for t in tokens])
        starts = self.to_device([0 if s is None else s for s in region_starts])
        mask = (self._columns[None, : cursor + 1] >= starts[:, None]).long()
        positions = (cursor - starts)[:, None]
        logits = self.runner.last_logits(ids, positions, mask, cursor).float()
        self.decode_steps += 1
        if self._sessions and all(getattr(s, "replays_graph", False) for s in self._sessions):
            self.graph_steps += 1
        return logits

    def warm_up(self, prefill_chunk: int) -> None:
        """Run the forwards serving runs before the first request comes: a decode step of every row,
        a one-row first chunk of a prompt of each power-of-two length below ``prefill_chunk`` and of
        that length itself, and a later chunk of that length (a longer prompt's). On CUDA that
        captures their graphs (falcon-7b on an H200: 2.6 s for the decode step with its kernels'
        compilation, ~0.1 s per chunk length), which the first requests would otherwise wait for.
        It writes only cache entries that are masked until a sequence rewrites them."""
        longest = min(prefill_chunk, self.width)
        lengths = [1 << i for i in range(longest.bit_length()) if 1 << i < longest] + [longest]
        chunks = [(length, 0) for length in lengths]  # (tokens, column): first chunks start their row
        if 2 * longest <= self.width:
            chunks.append((longest, longest))
        for length, start in chunks:
            for _ in range(2):  # a prompt shape is captured at its second use
                self.prefill(range(0, 1), [[self.pad_id] * length], 0, start)
        self.decode([None] * self.rows, [None] * self.rows, 0)
        self.decode_steps = self.graph_steps = 0  # what /health counts starts with serving

    def to_device(self, data: list) -> torch.Tensor:
        """``data`` as an int64 tensor on the device, copied without waiting for the GPU's queued work.

        From pageable memory a host-to-device copy first waits for the stream to drain, which would
        stall the host behind a decode step still in flight; from pinned memory it is queued."""
        if self.device.type != "cuda":
            return torch.tensor(data, dtype=torch.long)
        return torch.tensor(data, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)

    def shift(self, offset: int) -> None:
        """Move every row's cache entries ``offset`` columns (left when negative)."""
        self.runner.shift_cache(offset)
