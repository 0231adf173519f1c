"""Serving a multi-rank engine: rank 0 takes the requests, every rank runs the same forward passes.

Under ``mpirun -n W`` each rank holds its part of the model and every forward pass is collective
(tensor-parallel all-gathers, pipeline sends), so all ranks must make the same runner calls in
the same order. Rank 0's :class:`LeaderSlots` broadcasts each call (a few ints and token ids)
over a gloo group before making it; the other ranks :func:`follow` and make it too. Sampling
happens on rank 0 only: the logits are the same everywhere, and the next call carries the token.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from compiler_core.runtime.runner import ModelRunner
from compiler_core.serve.slots import SlotRunner

#: Followers wait for the next call as long as the server stays idle.
IDLE_TIMEOUT = datetime.timedelta(days=365)


def call_group() -> Any:
    """A gloo group of every rank for the broadcast calls (collective: every rank calls it once)."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class LeaderSlots(SlotRunner):
    """Rank 0's SlotRunner: announces every call to the other ranks, then makes it."""

    #: The other ranks get each step's tokens in the announcement, so they must be on the host.
    takes_device_tokens = False

    def __init__(self, runner: ModelRunner, rows: int, width: int, pad_id: int, group: Any) -> None:
        super().__init__(runner, rows, width, pad_id)
        self.group = group

    def _announce(self, *call: Any) -> None:
        dist.broadcast_object_list([call], src=0, group=self.group)

    def prefill(self, rows: range, ids: list[list[int]], region_start: int, start: int) -> torch.Tensor:
        self._announce("prefill", rows, ids, region_start, start)
        return super().prefill(rows, ids, region_start, start)

    def decode(self, tokens: list[int | None], region_starts: list[int | None], cursor: int) -> torch.Tensor:
        self._announce("decode", tokens, region_starts, cursor)
        return super().decode(tokens, region_starts, cursor)

    def shift(self, offset: int) -> None:
        self._announce("shift", offset)
        super().shift(offset)

    def close(self) -> None:
        """Tell the other ranks that serving is over."""
        self._announce("close")


def follow(slots: SlotRunner, group: Any) -> None:
    """Make every call rank 0 announces, until it announces ``close`` (the ranks other than 0)."""
    calls = {"prefill": slots.prefill, "decode": slots.decode, "shift": slots.shift}
    while True:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=group)
        name, *args = received[0]
        if name == "close":
            return
        calls[name](*args)
