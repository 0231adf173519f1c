"""Per-forward state shared by every node of a graph: positions, mask, KV cache, collectives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

FP8_E4M3_MAX = 448.0


class Communicator(Protocol):
    """Collectives within a tensor-parallel group.

    ``graph_capturable`` says whether the collectives may be recorded into a CUDA graph (NCCL's
    can; an exchange between Python threads cannot).
    """

    tp_size: int
    graph_capturable: bool

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor, axis: int) -> torch.Tensor: ...


@dataclass
class CacheSlot:
    """One attention layer's cache: [batch, kv_heads, max_len, head_dim] for K and V.

    When ``scale`` is set the slot stores a quantized type (e.g. float8_e4m3fn): values are
    divided by the scale and saturated on write, multiplied back on read.
    """

    k: torch.Tensor
    v: torch.Tensor
    scale: torch.Tensor | None = None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x.to(self.k.dtype)
        limit = torch.finfo(self.k.dtype).max
        return (x.float() / self.scale).clamp(-limit, limit).to(self.k.dtype)

    def _decode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return x
        return (x.float() * self.scale).to(dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        # narrow + copy_ (which also converts the dtype): the fewest ops per decode step.
        n = k.shape[2]
        self.k.narrow(2, start, n).copy_(k if self.scale is None else self._encode(k))
        self.v.narrow(2, start, n).copy_(v if self.scale is None else self._encode(v))

    def read(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(self.k.narrow(2, 0, end), dtype), self._decode(self.v.narrow(2, 0, end), dtype)

    def as_stored(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` as a read gives it back after a write: what attention sees of new tokens it does not
        read from the cache (a quantized cache rounds them on the way in)."""
        return self._decode(self._encode(x), dtype)

    def write_at(self, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> None:
        """Write K/V [b, heads, n, dim] at the columns held in device tensor ``columns`` [n] (graph-capturable)."""
        _bytes(self.k).index_copy_(2, columns, _bytes(self._encode(k)))
        _bytes(self.v).index_copy_(2, columns, _bytes(self._encode(v)))

    def read_all(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(self.k, dtype), self._decode(self.v, dtype)

    def gather_rows(self, rows: torch.Tensor) -> CacheSlot:
        """A copy of the cache rows held in device tensor ``rows`` (graph-capturable; see :meth:`scatter_rows`)."""
        return CacheSlot(
            _bytes(self.k).index_select(0, rows).view(self.k.dtype),
            _bytes(self.v).index_select(0, rows).view(self.v.dtype),
            self.scale,
        )

    def scatter_rows(self, rows: torch.Tensor, gathered: CacheSlot) -> None:
        """Put the rows of ``gathered`` (from :meth:`gather_rows` with the same ``rows``) back."""
        _bytes(self.k).index_copy_(0, rows, _bytes(gathered.k))
        _bytes(self.v).index_copy_(0, rows, _bytes(gathered.v))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A one-byte float tensor viewed as uint8: CUDA's index_copy_ has no float8 kernels."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


@dataclass
class KVCache:
    """Preallocated key/value storage for every attention slot of one rank."""

    slots: dict[str, CacheSlot]
    max_len: int

    @classmethod
    def allocate(
        cls,
        specs: dict[str, dict[str, Any]],
        batch: int,
        max_len: int,
        device: torch.device | str,
    ) -> KVCache:
        """``specs`` maps slot -> {num_kv_heads, head_dim, dtype, scale (optional tensor)}."""
        slots = {}
        for name, spec in specs.items():
            shape = (batch, spec["num_kv_heads"], max_len, spec["head_dim"])
            dtype = spec["dtype"]
            slots[name] = CacheSlot(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                spec.get("scale"),
            )
        return cls(slots, max_len)

    @property
    def batch(self) -> int:
        """Rows of the cache (0 for a graph without attention)."""
        return next((slot.k.shape[0] for slot in self.slots.values()), 0)

    def rows(self, rows: range) -> KVCache:
        """Cache rows ``rows`` (consecutive) alone, as a smaller batch sharing this cache's storage: a
        forward pass given it reads and writes those rows only (in-flight batching fills a few slots
        while the others wait for their next decode step)."""
        if rows.step != 1:
            raise ValueError(f"cache rows must be consecutive, got {rows}")
        slots = {
            name: CacheSlot(
                slot.k.narrow(0, rows.start, len(rows)), slot.v.narrow(0, rows.start, len(rows)), slot.scale
            )
            for name, slot in self.slots.items()
        }
        return KVCache(slots, self.max_len)

    def shift(self, offset: int) -> None:
        """Move every row's entries ``offset`` columns along the sequence (left when negative), in place.

        Entries pushed past one end come back at the other; callers mask those columns.
        """
        for slot in self.slots.values():
            for stored in (_bytes(slot.k), _bytes(slot.v)):
                stored.copy_(stored.roll(offset, dims=2))

    def reorder(self, index: torch.Tensor) -> None:
        """Gather batch rows (beam search keeps the cache of each surviving beam).

        With as many rows in ``index`` as in the cache the rows are rewritten in place, so the
        storage allocated once stays the storage every later step (and a captured graph) uses.
        """
        for slot in self.slots.values():
            k, v = _bytes(slot.k), _bytes(slot.v)  # float8 rows move as bytes (no CUDA float8 gather)
            if index.shape[0] == slot.k.shape[0]:
                k.copy_(k.index_select(0, index))
                v.copy_(v.index_select(0, index))
            else:
                slot.k = k.index_select(0, index).view(slot.k.dtype)
                slot.v = v.index_select(0, index).view(slot.v.dtype)


@dataclass
class ForwardContext:
    """What a forward pass knows besides its input tensor.

    ``attention_mask`` is [batch, start + seq] with 1 for real tokens and 0 for padding,
    covering the cached tokens and the new ones; ``positions`` are the new tokens' position
    ids [batch, seq]. Kernels memoise derived tensors (rotary tables, masks) in ``memo`` so
    each is computed once per forward, not once per layer.

    With ``start_index`` set (a device tensor [1] holding the cache offset) the forward has static
    shapes, as CUDA graphs need: the new tokens of each row are written from that offset on,
    attention covers the whole cache (causal among the new tokens), and ``attention_mask`` spans
    the whole cache with 0 for every slot that is padding or not yet written. That is a decode
    step, or a prompt chunk of cache rows ``row_index`` (a device tensor [rows]; the batch is
    those rows) whose real last token is at ``last_index`` (a device tensor [1]: the chunk may end
    in padding).

    ``new_sequences`` says that every row's new tokens begin its sequence: none of them is padding
    and nothing before them is attended. Attention may then run causally over the new tokens alone
    (flash attention on CUDA) instead of over the cache under a mask.
    """

    positions: torch.Tensor
    attention_mask: torch.Tensor
    start: int = 0
    cache: KVCache | None = None
    comm: Communicator | None = None
    memo: dict[Any, torch.Tensor] = field(default_factory=dict)
    start_index: torch.Tensor | None = None
    row_index: torch.Tensor | None = None
    last_index: torch.Tensor | None = None
    new_sequences: bool = False

    def columns(self, seq: int) -> torch.Tensor:
        """The cache columns ``start_index + [0, seq)`` a static forward writes (made once per forward)."""
        key = ("columns", seq)
        if key not in self.memo:
            assert self.start_index is not None
            self.memo[key] = self.start_index + torch.arange(seq, device=self.start_index.device)
        return self.memo[key]

    @classmethod
    def for_prompt(cls, attention_mask: torch.Tensor, **kw: Any) -> ForwardContext:
        """Context for a whole (left-padded) prompt: positions count real tokens only."""
        return cls(positions=positions_from_mask(attention_mask), attention_mask=attention_mask, **kw)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (pads get 1)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)
