"""Data-plane transports, by name. See ``base`` for the interface."""

from __future__ import annotations

import torch

from netloader.transport.base import Incoming, Outgoing, Transport
from netloader.transport.process_group import GlooTransport, HcclTransport, NcclTransport
from netloader.transport.tcp import TcpTransport

TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t for t in (TcpTransport, NcclTransport, HcclTransport, GlooTransport)
}


def preferred(device: torch.device) -> list[str]:
    """Transports a client with tensors on ``device`` proposes, best first."""
    names = [t.name for t in (NcclTransport, HcclTransport) if t.supports(device)]
    return [*names, TcpTransport.name]


__all__ = ["TRANSPORTS", "Incoming", "Outgoing", "Transport", "preferred"]
