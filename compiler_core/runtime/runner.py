"""Whole-model forward passes over the ranks of an engine or checkpoint.

A runner hides the parallel layout from generation: ``logits()`` returns the full-vocabulary
logits of the last position(s) on every caller, whatever the tp/pp split.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from compiler_core.mapping import Mapping
from compiler_core.runtime.session import RankSession


class ModelRunner(ABC):
    """Forward passes of the whole model, whatever its split."""

    mapping: Mapping
    device: torch.device
    #: The engine's build settings (max_batch_size, max_input_len, max_seq_len) that generation
    #: enforces; None for runners over a checkpoint, which have no build limits.
    build_limits: dict[str, Any] | None = None

    @abstractmethod
    def allocate(self, batch: int, max_len: int) -> None: ...

    @abstractmethod
    def logits(
        self, ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] for the new tokens ``ids`` written at cache offset ``start``."""

    @abstractmethod
    def reorder_cache(self, index: torch.Tensor) -> None: ...

    def last_logits(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        new_sequences: bool = False,
    ) -> torch.Tensor:
        """Logits [batch, vocab] of the last new token only (what generation needs).

        ``new_sequences`` promises that every row's new tokens begin its sequence, unpadded (see
        :class:`~compiler_core.runtime.context.ForwardContext`); ranks that support it attend over
        the new tokens alone. Runners whose ranks can skip the other positions' output layers
        override this.
        """
        return self.logits(ids, positions, attention_mask, start)[:, -1]

    @property
    def supports_rows(self) -> bool:
        """Whether :meth:`row_logits` and :meth:`shift_cache` work (every rank's session supports rows)."""
        return False

    def row_logits(
        self,
        rows: range,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        new_sequences: bool = False,
    ) -> torch.Tensor:
        """Logits [len(rows), vocab] of the last of ``ids`` [len(rows), seq], run against the consecutive
        cache rows ``rows`` alone (``new_sequences`` as in :meth:`last_logits`).

        The other rows' caches are left as they are, so newcomers' prompts fill their own slots
        between two decode steps of the rest of the batch (in-flight batching).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run some cache rows alone")

    def shift_cache(self, offset: int) -> None:
        """Move every cache row's entries ``offset`` columns (see :meth:`KVCache.shift`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot shift its KV cache")


class ThreadGroup:
    """Collectives between tensor-parallel ranks that run as threads of one process."""

    def __init__(self, size: int) -> None:
        self.tp_size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[torch.Tensor | None] = [None] * size

    def member(self, index: int) -> _ThreadMember:
        return _ThreadMember(self, index)

    def _exchange(self, index: int, x: torch.Tensor) -> list[torch.Tensor]:
        self._slots[index] = x
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()
        return parts


class _ThreadMember:
    graph_capturable = False

    def __init__(self, group: ThreadGroup, index: int) -> None:
        self.group, self.index, self.tp_size = group, index, group.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.group._exchange(self.index, x)
        # Sum in rank order on every member so all of them get bit-identical results.
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.cat(self.group._exchange(self.index, x), dim=axis)


class LocalRunner(ModelRunner):
    """Every rank in this process: tensor-parallel ranks as threads, pipeline stages in turn."""

    def __init__(self, sessions: Sequence[RankSession], mapping: Mapping) -> None:
        if len(sessions) != mapping.world_size:
            raise ValueError(f"{len(sessions)} sessions for world_size {mapping.world_size}")
        self.sessions = list(sessions)
        self.mapping = mapping
        self.device = sessions[0].device
        if mapping.tp_size > 1:
            for stage in range(mapping.pp_size):
                group = ThreadGroup(mapping.tp_size)
                for tp in range(mapping.tp_size):
                    sessions[mapping.rank(tp, stage)].comm = group.member(tp)

    def allocate(self, batch: int, max_len: int) -> None:
        for s in self.sessions:
            s.allocate(batch, max_len)

    def reorder_cache(self, index: torch.Tensor) -> None:
        for s in self.sessions:
            s.reorder_cache(index)

    @property
    def supports_rows(self) -> bool:
        return all(s.supports_rows for s in self.sessions)

    def row_logits(self, rows, ids, positions, attention_mask, start, new_sequences=False):
        return self._forward(ids, positions, attention_mask, start, self._last_only(), rows, new_sequences)[:, -1]

    def shift_cache(self, offset: int) -> None:
        for s in self.sessions:
            s.shift_cache(offset)

    def logits(self, ids, positions, attention_mask, start):
        return self._forward(ids, positions, attention_mask, start, last_only=False)

    def last_logits(self, ids, positions, attention_mask, start, new_sequences=False):
        return self._forward(ids, positions, attention_mask, start, self._last_only(), None, new_sequences)[:, -1]

    def _last_only(self) -> bool:
        last_stage = [self.sessions[r] for r in self.mapping.tp_group(self.mapping.world_size - 1)]
        return all(s.supports_last_only for s in last_stage)

    def _forward(
        self,
        ids,
        positions,
        attention_mask,
        start,
        last_only: bool,
        rows: range | None = None,
        new_sequences: bool = False,
    ) -> torch.Tensor:
        x = ids
        for stage in range(self.mapping.pp_size):
            ranks = [self.mapping.rank(tp, stage) for tp in range(self.mapping.tp_size)]
            # Only the last stage may drop positions: earlier stages feed every position onwards.
            kw: dict[str, Any] = {"last_only": True} if last_only and stage == self.mapping.pp_size - 1 else {}
            if rows is not None:
                kw["rows"] = rows
            if new_sequences and all(self.sessions[r].supports_new_sequences for r in ranks):
                kw["new_sequences"] = True
            outs = self._run_stage(ranks, x, positions, attention_mask, start, kw)
            x = outs[0]
        return x

    def _run_stage(self, ranks, x, positions, attention_mask, start, kw) -> list[torch.Tensor]:
        if len(ranks) == 1:
            return [self.sessions[ranks[0]].forward(x, positions, attention_mask, start, **kw)]
        outs: list[torch.Tensor | None] = [None] * len(ranks)
        errors: list[BaseException] = []

        def work(i: int, rank: int) -> None:
            try:
                outs[i] = self.sessions[rank].forward(x, positions, attention_mask, start, **kw)
            except BaseException as exc:
                errors.append(exc)
                self.sessions[rank].comm.group._barrier.abort()

        threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return outs
