"""Who holds the weights: a model name and one rank of its parallel layout.

Two processes may exchange weights only when their identities are equal; the first difference is
reported as a reason a person can act on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from netloader.errors import Code, ProtocolError

MAX_NAME_CHARS = 4096


@dataclass(frozen=True)
class Identity:
    """One rank of one model in one tensor/pipeline-parallel layout."""

    model: str
    rank: int = 0
    world_size: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if len(self.model) > MAX_NAME_CHARS:
            raise ValueError(f"model name is longer than {MAX_NAME_CHARS} characters")
        for field in ("rank", "world_size", "tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{field} must be an int, got {value!r}")
        if self.world_size < 1 or self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"sizes must be >= 1: {self}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.tensor_parallel_size * self.pipeline_parallel_size > self.world_size:
            raise ValueError(
                f"tensor_parallel_size * pipeline_parallel_size "
                f"({self.tensor_parallel_size} * {self.pipeline_parallel_size}) "
                f"exceeds world_size {self.world_size}"
            )

    @property
    def layout(self) -> str:
        return (
            f"world_size={self.world_size} tp={self.tensor_parallel_size} "
            f"pp={self.pipeline_parallel_size}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Identity:
        if not isinstance(obj, dict) or set(obj) != set(cls.__dataclass_fields__):
            raise ProtocolError(
                f"identity must be an object with keys {sorted(cls.__dataclass_fields__)}"
            )
        try:
            return cls(**obj)
        except ValueError as exc:
            raise ProtocolError(f"invalid identity: {exc}") from None

    def mismatch(
        self, other: Identity, mine: str = "here", theirs: str = "peer"
    ) -> tuple[Code, str] | None:
        """``(code, reason)`` for the first difference from ``other``, else None.

        ``mine`` and ``theirs`` name the two sides in the reason (e.g. "server", "client").
        """
        if self.model != other.model:
            return (
                Code.MODEL,
                f"model differs: {mine} has {self.model!r}, {theirs} wants {other.model!r}",
            )
        if (self.world_size, self.tensor_parallel_size, self.pipeline_parallel_size) != (
            other.world_size,
            other.tensor_parallel_size,
            other.pipeline_parallel_size,
        ):
            return (
                Code.LAYOUT,
                f"parallel layout differs: {mine} has {self.layout}, {theirs} wants {other.layout}",
            )
        if self.rank != other.rank:
            return (
                Code.RANK,
                f"rank differs: {mine} has rank {self.rank}, {theirs} wants rank {other.rank}",
            )
        return None
