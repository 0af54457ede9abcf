"""The client's one meeting point with the transport registry: checking the names a caller
gave, which transports to offer a source, and the one call that runs the engine a source
chose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from netloader.errors import ConfigError
from netloader.transport import Incoming, engine, preferred


def check_known(names: Sequence[str] | None) -> None:
    """ConfigError unless every name the caller chose is a known transport that can run here."""
    for name in names or ():
        reason = engine(name).absent()
        if reason is not None:
            raise ConfigError(f"transport {name!r} cannot run here: {reason}")


@dataclass(frozen=True)
class Offer:
    """The transports to offer a source: the caller's choice (``chosen``), else the best for
    the destination's ``device`` at that source's host (CUDA IPC only to one on this machine)."""

    chosen: tuple[str, ...] | None
    device: torch.device

    def to(self, host: str) -> list[str]:
        return list(self.chosen or preferred(self.device, host))


def run_transport(name: str, inc: Incoming) -> None:
    """Receive one source's share with transport ``name``, the one its Accept chose."""
    engine(name).receive(inc)
