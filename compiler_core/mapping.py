"""Tensor/pipeline parallel layout: which rank holds which part of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler_core.errors import UsageError


@dataclass(frozen=True)
class Mapping:
    """``world_size = tp_size * pp_size``; rank r = pp_rank * tp_size + tp_rank."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        for field in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"mapping: {field} must be a positive integer, got {value!r}")
        if self.world_size != self.tp_size * self.pp_size:
            raise UsageError(
                f"mapping: world_size {self.world_size} != tp_size {self.tp_size} x pp_size {self.pp_size}"
            )

    @classmethod
    def create(cls, tp_size: int = 1, pp_size: int = 1, world_size: int | None = None) -> Mapping:
        return cls(world_size if world_size is not None else tp_size * pp_size, tp_size, pp_size)

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def ranks(self) -> range:
        return range(self.world_size)

    def tp_group(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s pipeline stage (its tensor-parallel group)."""
        pp = self.pp_rank(rank)
        return [self.rank(t, pp) for t in range(self.tp_size)]

    def is_first_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == self.pp_size - 1

    def to_json(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

    @classmethod
    def from_json(cls, data: Any, source: str = "config.json") -> Mapping:
        """Read a config's ``mapping`` object; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: field 'mapping' must be an object")
        values = []
        for field in ("world_size", "tp_size", "pp_size"):
            if field not in data:
                raise UsageError(f"{source}: field 'mapping.{field}' is missing")
            value = data[field]
            # 2.0, "2" and true are refused rather than truncated or coerced: a hand-edited mapping
            # must say exactly what it means.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{source}: field 'mapping.{field}' must be a positive integer, got {value!r}")
            values.append(value)
        try:
            return cls(*values)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None


def default_layer_ranges(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous stages; the first ``num_layers % pp_size`` stages get one extra layer."""
    if pp_size > num_layers:
        raise UsageError(f"pp_size {pp_size} exceeds the number of layers ({num_layers})")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        n = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges
