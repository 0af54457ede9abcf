"""Settings, grouped in small frozen objects the way httpx groups ``Timeout`` and ``Limits``.

They are built once (from command-line flags, the vLLM config, or a caller's keywords) and passed
down whole, so adding a setting touches the object and the place that reads it, nothing between.
Every value is checked when the object is made; a bad one raises ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from netloader.errors import ConfigError, check_int, check_seconds
from netloader.plan import MAX_CHUNK, MIN_CHUNK

if TYPE_CHECKING:
    import torch

    from netloader.manifest import Manifest
    from netloader.protocol import Accept

DEFAULT_CONNECT_TIMEOUT = 5.0
#: A client's whole handshake, including the time it may queue at a busy server.
CLIENT_HANDSHAKE_TIMEOUT = 60.0
#: How long a server gives one connection to finish its handshake (queueing included).
SERVER_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 30.0

# 4 MiB: a chunk is still in the CPU cache when it is hashed right after landing. XXH3 measured
# on the development machine: 47 GB/s on a cache-resident 4 MiB buffer, 14 GB/s on 16 MiB.
DEFAULT_CHUNK = 4 << 20
MAX_STREAMS = 64
MAX_DEFAULT_STREAMS = 8
#: Sources a client takes chunks from at once. Four saturate a client's downlink when each
#: source's uplink carries a quarter of it, without opening more connections than that pays.
DEFAULT_MAX_SOURCES = 4


@dataclass(frozen=True)
class Timeouts:
    """Seconds to connect, for a whole handshake, and without a completed chunk (idle)."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    handshake: float = CLIENT_HANDSHAKE_TIMEOUT
    idle: float = DEFAULT_IDLE_TIMEOUT

    def __post_init__(self) -> None:
        check_seconds(
            connect_timeout=self.connect,
            handshake_timeout=self.handshake,
            idle_timeout=self.idle,
        )


#: A server's defaults: it gives a handshake half the time a client waits for one.
SERVER_TIMEOUTS = Timeouts(handshake=SERVER_HANDSHAKE_TIMEOUT)


@dataclass(frozen=True)
class Limits:
    """What one server runs at once: transfers, clients queued for one, streams per transfer."""

    max_clients: int = 4
    max_waiting: int = 32
    max_streams: int = 8

    def __post_init__(self) -> None:
        check_int("max_clients", self.max_clients, 1)
        check_int("max_waiting", self.max_waiting, 0)
        check_int("max_streams", self.max_streams, 1)


@dataclass(frozen=True)
class ServeOptions:
    """How a server listens and whom it serves.

    ``listen_port`` is a base port: the server listens on ``listen_port + rank``; None lets the
    OS choose. ``output_prefix``: write the address to ``{output_prefix}{rank}.txt``.
    ``verify_before_send``: hash every chunk again just before sending it. ``cuda_ipc``: let
    clients on this host map the served CUDA tensors (read-write: see ``transport.cuda_ipc``).
    """

    host: str = "127.0.0.1"
    listen_port: int | None = None
    output_prefix: str | None = None
    token: bytes | None = field(default=None, repr=False)
    limits: Limits = Limits()
    timeouts: Timeouts = SERVER_TIMEOUTS
    chunk_size: int = DEFAULT_CHUNK
    verify_before_send: bool = False
    #: Bytes per second this server sends at most, to all its clients together (None: no cap).
    max_upload_rate: float | None = None
    #: Offer the ``cuda_ipc`` transport to clients on this host (CUDA tensors only).
    cuda_ipc: bool = True

    def __post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"chunk_size {self.chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
        rate = self.max_upload_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
        ):
            raise ConfigError(f"max_upload_rate must be a positive number of bytes/s, got {rate!r}")


@dataclass(frozen=True)
class PullOptions:
    """How a client pulls: token, streams, transports it offers, timeouts, size bound, checks.

    ``streams``: parallel TCP streams (None: one per usable core, 2 to 8). ``transports``: names
    to offer, best first (None: the best for the destination's device, then TCP). ``max_bytes``:
    the most a pull into fresh tensors may allocate (None: this machine's memory for CPU).
    ``verify``: check every chunk against the server's digests. ``max_sources``: how many of
    the given sources deliver chunks at once (the others stand by, in order, for one that fails).
    ``discovery``: a client that relays (``pull(relay=...)``) tells its first source where it
    listens and takes the peers that source names; off, it uses only the listed sources.
    """

    token: bytes | None = field(default=None, repr=False)
    streams: int | None = None
    transports: tuple[str, ...] | None = None
    timeouts: Timeouts = Timeouts()
    max_bytes: int | None = None
    verify: bool = True
    max_sources: int = DEFAULT_MAX_SOURCES
    #: Let the first source say which peers (relays ahead in its chain) to pull from.
    discovery: bool = True

    def __post_init__(self) -> None:
        if self.streams is not None and not 1 <= self.streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be in 1..{MAX_STREAMS}, got {self.streams}")
        check_int("max_sources", self.max_sources, 1)
        if self.transports is not None:
            object.__setattr__(self, "transports", tuple(self.transports))

    def stream_count(self) -> int:
        return self.streams or default_streams()


@dataclass(frozen=True)
class PullHooks:
    """What a caller sees of one pull: ``progress(nbytes)`` as chunks land, ``on_accept(accept)``
    before any weight moves, and ``allocate(manifest)``, which returns the destination tensors
    once the server's manifest is known (e.g. views of a file being written)."""

    progress: Callable[[int], None] | None = None
    on_accept: Callable[[Accept], None] | None = None
    allocate: Callable[[Manifest], Mapping[str, torch.Tensor]] | None = None


def default_streams() -> int:
    """Parallel TCP streams to ask for: one per usable core, at least 2, at most 8.

    On loopback every stream costs a core for the kernel's copy; over a real network more
    streams than cores still help to fill a fat link. The server caps it by the chunk count.
    """
    return max(2, min(MAX_DEFAULT_STREAMS, len(os.sched_getaffinity(0))))


_RATE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "bit": 1 / 8,
    "kbit": 10**3 / 8,
    "mbit": 10**6 / 8,
    "gbit": 10**9 / 8,
}


def parse_rate(value: object, name: str = "rate") -> float:
    """Bytes per second from a number (bytes/s) or a string such as ``100MB/s``, ``800Mbit``,
    ``1.5GiB/s``. ConfigError names the bad value and what is allowed."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    text = value.strip().lower().removesuffix("/s") if isinstance(value, str) else ""
    unit = next((u for u in sorted(_RATE_UNITS, key=len, reverse=True) if text.endswith(u)), "")
    try:
        rate = float(text.removesuffix(unit)) * _RATE_UNITS.get(unit, 1)
    except ValueError:
        rate = 0.0
    if not 0 < rate < math.inf:
        raise ConfigError(
            f"{name} = {value!r} is not a rate; give bytes per second as a number, or a string "
            f"like 100MB/s, 800Mbit/s or 1GiB/s (units: {', '.join(_RATE_UNITS)})"
        )
    return rate


T = TypeVar("T")


def with_keywords(options: T, keywords: Mapping[str, Any]) -> T:
    """``options`` with flat keyword settings applied: a field's own name, a ``Timeouts`` field
    as ``<name>_timeout`` (``idle_timeout``), or a field of a nested ``Limits``/``PullHooks``.

    This is how ``Server(..., max_clients=2)`` and ``pull(..., idle_timeout=5)`` keep working
    beside the option objects. An unknown name is a TypeError, as for any function.
    """
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    for key, value in keywords.items():
        if key in names:
            direct[key] = value
            continue
        owner = _nested_owner(options, key)
        if owner is None:
            raise TypeError(f"unexpected keyword argument {key!r}")
        nested.setdefault(owner[0], {})[owner[1]] = value
    for name, values in nested.items():
        direct[name] = dataclasses.replace(direct.get(name, getattr(options, name)), **values)
    return dataclasses.replace(options, **direct)  # type: ignore[type-var]


def _nested_owner(options: Any, key: str) -> tuple[str, str] | None:
    """(field of ``options``, field inside it) that the flat name ``key`` stands for."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        inner = {g.name for g in dataclasses.fields(value)}
        if isinstance(value, Timeouts) and key.endswith("_timeout"):
            if key.removesuffix("_timeout") in inner:
                return f.name, key.removesuffix("_timeout")
        elif key in inner:
            return f.name, key
    return None
