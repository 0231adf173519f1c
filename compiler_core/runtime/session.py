"""One rank of a built engine, ready to run forward passes with its own KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from compiler_core.ir import Graph
from compiler_core.runtime.context import Communicator, ForwardContext, KVCache
from compiler_core.runtime.executor import GraphExecutor


class RankSession(ABC):
    """The runtime's view of a backend: allocate a cache, run steps, reorder beams."""

    graph: Graph
    device: torch.device
    #: True when ``forward`` accepts ``last_only=True`` (outputs for the last position only, which
    #: spares the prompt pass the lm_head over every position). Backends without it get full outputs.
    supports_last_only: bool = False

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


class TorchSession(RankSession):
    """A rank executed by the torch reference executor (CPU or CUDA)."""

    def __init__(
        self,
        graph: Graph,
        weights: dict[str, torch.Tensor],
        device: str | torch.device,
        comm: Communicator | None = None,
    ):
        self.graph = graph
        self.device = torch.device(device)
        self.executor = GraphExecutor(graph, weights, self.device)
        self.comm = comm
        self.cache: KVCache | None = None

    def allocate(self, batch: int, max_len: int) -> None:
        self.cache = self.executor.allocate_cache(batch, max_len)

    supports_last_only = True

    @torch.inference_mode()
    def forward(self, x, positions, attention_mask, start, last_only: bool = False):
        ctx = ForwardContext(
            positions=positions.to(self.device),
            attention_mask=attention_mask.to(self.device),
            start=start,
            cache=self.cache,
            comm=self.comm,
        )
        (out,) = self.executor.run({self.graph.inputs[0]: x.to(self.device)}, ctx, last_only=last_only).values()
        return out

    def reorder_cache(self, index):
        if self.cache is not None:
            self.cache.reorder(index.to(self.device))
