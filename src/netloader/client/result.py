"""What a pull returns: the tensors, and which sources delivered how much."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PullResult:
    tensors: dict[str, torch.Tensor]
    #: The source that defined the content: the first in the list that accepted (with
    #: relay placement it may have sent this client to other peers: see ``sources``).
    source: str
    total_bytes: int
    seconds: float
    transport: str
    streams: int
    #: Verified bytes each source that took part delivered, in the order of the list.
    sources: dict[str, int] = field(default_factory=dict)
    #: Bytes asked again of another source: after the source fetching them failed, or as
    #: copies of chunks late at a slow or stalled source (``copied``, included here).
    refetched: int = 0
    #: Of ``refetched``, the bytes of late chunks' copies (the first verified copy wins).
    copied: int = 0

    @property
    def gbps(self) -> float:
        return self.total_bytes / 1e9 / max(self.seconds, 1e-9)

    def describe_sources(self, unit: float = 1.0, suffix: str = " bytes") -> str:
        """``A`` when one source delivered everything, else ``A (n bytes), B (m bytes)``."""
        used = {s: n for s, n in self.sources.items() if n}
        if len(used) <= 1:
            return next(iter(used), self.source)
        return ", ".join(f"{s} ({_amount(n / unit)}{suffix})" for s, n in used.items())


def _amount(value: float) -> str:
    return f"{value:.3f}" if value != int(value) else str(int(value))
