"""Data-plane transports: one long-lived engine per transport, registered here, in the order a
client prefers them. See ``base`` for the interface; a new transport is its module plus one
line in ``_ENGINES``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from netloader import protocol
from netloader.errors import ConfigError
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.cuda_ipc import CudaIpcEngine
from netloader.transport.mooncake import MooncakeEngine
from netloader.transport.process_group import GlooEngine, HcclEngine, NcclEngine
from netloader.transport.tcp import TcpEngine

if TYPE_CHECKING:
    from netloader.options import ServeOptions

#: Best first: a client proposes, unasked, every engine whose ``proposes`` agrees, in this order.
_ENGINES: tuple[Engine, ...] = (
    CudaIpcEngine(),
    NcclEngine(),
    HcclEngine(),
    MooncakeEngine(),
    TcpEngine(),
    GlooEngine(),
)

ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Make ``engine`` known by its name, with its messages and its offer's bound."""
    if engine.name in ENGINES:
        raise ValueError(f"a transport named {engine.name!r} is registered already")
    protocol.register(*engine.messages)
    protocol.allow_offer(engine.name, engine.offer_limit)
    ENGINES[engine.name] = engine
    return engine


for _engine in _ENGINES:
    register(_engine)


def engine(name: str) -> Engine:
    """The engine called ``name``; ConfigError names the known ones."""
    found = ENGINES.get(name)
    if found is None:
        raise ConfigError(f"unknown transport {name!r}; known: {sorted(ENGINES)}")
    return found


def offered(options: ServeOptions) -> list[Engine]:
    """The engines a server with ``options`` offers, in the registry's order."""
    return [e for e in ENGINES.values() if e.enabled(options)]


def preferred(device: torch.device, source_host: str | None = None) -> list[str]:
    """Transports a client with tensors on ``device`` proposes to a source at ``source_host``,
    best first, ending with TCP (which any server can use)."""
    return [e.name for e in ENGINES.values() if e.proposes(device, source_host)]


def availability() -> dict[str, str]:
    """Each transport: "available", or "absent: " and why it cannot run in this process."""
    return {
        name: "available" if (reason := e.absent()) is None else f"absent: {reason}"
        for name, e in ENGINES.items()
    }


__all__ = [
    "ENGINES",
    "Engine",
    "Incoming",
    "Outgoing",
    "Sending",
    "availability",
    "engine",
    "offered",
    "preferred",
    "register",
]
