"""Settings, grouped in small frozen objects the way httpx groups ``Timeout`` and ``Limits``.

They are built once (from command-line flags, the vLLM config, or a caller's keywords) and passed
down whole. Each field declares its setting once (``netloader.settings``: help, rule, flag, vLLM
key), and the command line and the vLLM config are built from those declarations, so adding a
setting touches its field and the place that reads it. Every value is checked when the object is
made, by the field's rule; a bad one raises ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from netloader.artifact_options import ArtifactOptions
from netloader.auth import TOKEN_ENV
from netloader.mooncake_options import MooncakeOptions
from netloader.plan import MAX_CHUNK, MIN_CHUNK
from netloader.protocol.fields import MAX_STREAMS
from netloader.rules import FLAG, NAMES, RATE, SECONDS, TEXT, integer, optional, size
from netloader.rules import parse_rate as parse_rate  # its former home: importers keep working
from netloader.settings import Group, Setting, check_fields, declared
from netloader.settings import with_keywords as with_keywords  # its former home

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
MAX_DEFAULT_STREAMS = 8
#: Sources a client takes chunks from at once. Four saturate a client's downlink when each
#: source's uplink carries a quarter of it, without opening more connections than that pays.
DEFAULT_MAX_SOURCES = 4


#: Given as a file, never as a value: the CLI's ``--token-file`` and vLLM's ``TOKEN_FILE``.
TOKEN_FILE = Setting(
    f"file holding a shared secret (at least 16 bytes); peers must prove they know it (or set "
    f"{TOKEN_ENV})",
    optional(TEXT),
    flag="--token-file",
    key="TOKEN_FILE",
)
_TOKEN = Setting(
    "the shared secret itself",
    no_flag="a secret stays off the command line: --token-file or NETLOADER_TOKEN",
    no_key="a secret stays out of the vLLM config: TOKEN_FILE or NETLOADER_TOKEN",
)


@dataclass(frozen=True)
class Timeouts:
    """Seconds to connect, for a whole handshake, and without a completed chunk (idle)."""

    #: Flat keywords and errors name these fields ``<name>_timeout`` (``idle_timeout``).
    keyword_suffix: ClassVar[str] = "_timeout"

    connect: float = declared(
        DEFAULT_CONNECT_TIMEOUT,
        Setting("seconds to connect to a source", SECONDS, "--connect-timeout", "CONNECT_TIMEOUT"),
    )
    handshake: float = declared(
        CLIENT_HANDSHAKE_TIMEOUT,
        Setting(
            "seconds for a whole handshake, queueing for a slot included",
            SECONDS,
            "--handshake-timeout",
            "HANDSHAKE_TIMEOUT",
            note="defaults differ: a server gives 30 s, a client (pull) waits 60 s; in vLLM it "
            "is the server's, and a vLLM client waits HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT",
        ),
    )
    idle: float = declared(
        DEFAULT_IDLE_TIMEOUT,
        Setting(
            "seconds a transfer may go without completing a chunk",
            SECONDS,
            "--idle-timeout",
            "IDLE_TIMEOUT",
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self, suffix=self.keyword_suffix)


#: A server's defaults: it gives a handshake half the time a client waits for one.
SERVER_TIMEOUTS = Timeouts(handshake=SERVER_HANDSHAKE_TIMEOUT)


@dataclass(frozen=True)
class Limits:
    """What one server runs at once: transfers, clients queued for one, streams per transfer."""

    max_clients: int = declared(
        4,
        Setting(
            "transfers a server runs at once; further clients queue for a slot",
            integer(1),
            "--max-clients",
            "MAX_CLIENTS",
        ),
    )
    max_waiting: int = declared(
        32,
        Setting(
            "clients that may queue for a slot; more are refused as busy",
            integer(0),
            "--max-waiting",
            "MAX_WAITING",
        ),
    )
    max_streams: int = declared(
        8,
        Setting(
            "the most parallel streams a server grants one transfer",
            integer(1, MAX_STREAMS),
            "--max-streams",
            "MAX_STREAMS",
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)


_METRICS_PORT = Setting(
    "base port of Prometheus metrics (HTTP /metrics): each rank serves them on it + rank",
    *(optional(integer()), "--metrics-port", "METRICS_PORT"),
    cli_rule=dataclasses.replace(integer(1024, 65535), metavar="PORT"),
    unset="no metrics",
)


@dataclass(frozen=True)
class ServeOptions:
    """How a server listens and whom it serves (each field's declaration says what it means).

    ``listen_port`` and ``metrics_port`` are base ports (each rank adds its rank). ``cuda_ipc``
    lets clients on this host map the served CUDA tensors, read-write: see ``transport.cuda_ipc``.
    """

    host: str = declared(
        "127.0.0.1",
        Setting(
            "address the server binds to",
            TEXT,
            "--host",
            no_key="vLLM's LISTEN_HOST (NetloaderConfig.listen_host): its default is vLLM's "
            "host address, not 127.0.0.1",
        ),
    )
    listen_port: int | None = declared(
        None,
        Setting(
            "base port: each rank listens on it + its rank",
            optional(integer()),
            "--listen-port",
            "LISTEN_PORT",
            cli_rule=dataclasses.replace(integer(1024, 65535), metavar="PORT"),
            unset="a free port chosen by the OS",
            note="a port outside 1024..65535 is an error on the command line; in vLLM that "
            "worker opens no listener (a warning says so)",
        ),
    )
    metrics_port: int | None = declared(None, _METRICS_PORT)
    output_prefix: str | None = declared(
        None,
        Setting(
            "once listening, each rank writes {OUTPUT_PREFIX}{rank}.txt holding IP:port",
            optional(TEXT),
            "--output-prefix",
            "OUTPUT_PREFIX",
            cli_help="once listening, write the address to OUTPUT_PREFIX0.txt",
        ),
    )
    token: bytes | None = declared(None, _TOKEN, repr=False)
    limits: Limits = declared(Limits(), Group())  # noqa: RUF009 (frozen: sharing it is safe)
    timeouts: Timeouts = declared(  # noqa: RUF009 (frozen: sharing it is safe)
        SERVER_TIMEOUTS, Group(skip={"connect": "a server never connects"})
    )
    chunk_size: int = declared(
        DEFAULT_CHUNK,
        Setting(
            "bytes per chunk the server cuts its weights into, the unit of scheduling and "
            "checking; smaller chunks shorten each relay hop on slow links, larger ones cost "
            "less per byte",
            size(MIN_CHUNK, MAX_CHUNK),
            "--chunk-size",
            "CHUNK_SIZE",
        ),
    )
    verify_before_send: bool = declared(
        False,
        Setting(
            "hash every chunk again just before sending it (refuse tensors changed since load)",
            FLAG,
            "--verify-before-send",
            "VERIFY_BEFORE_SEND",
        ),
    )
    max_upload_rate: float | None = declared(
        None,
        Setting(
            "bytes/s the server sends at most, to all its clients together: a number or a "
            "string like 100MB/s or 800Mbit/s",
            optional(RATE),
            "--max-upload-rate",
            "MAX_UPLOAD_RATE",
            unset="no cap",
        ),
    )
    artifacts: ArtifactOptions = declared(ArtifactOptions(), Group())  # noqa: RUF009 (frozen)
    compile_cache: str | None = declared(
        None,
        Setting(
            "a cache root like VLLM_CACHE_ROOT (holding torch_compile_cache/) whose compile "
            "artifacts this server offers",
            optional(TEXT),
            "--compile-cache",
            no_key="a vLLM worker offers its own VLLM_CACHE_ROOT",
            unset="none",
        ),
    )
    cuda_ipc: bool = declared(
        True,
        Setting(
            "offer the cuda_ipc transport to clients on this host (CUDA tensors only; they map "
            "the served tensors, read-write)",
            FLAG,
            "--no-cuda-ipc",
            "CUDA_IPC",
            cli_help="never offer the cuda_ipc transport (clients on this host would map the "
            "served CUDA tensors, read-write)",
        ),
    )
    mooncake: MooncakeOptions = declared(MooncakeOptions(), Group())  # noqa: RUF009 (frozen)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class PullOptions:
    """How a client pulls: token, streams, transports it offers, timeouts, size bound, checks
    (each field's declaration says what it means).

    ``placement``: a client that relays (``pull(relay=...)``) tells its first source where it
    listens, and that source may place it behind peers ahead of it (relays); off, it takes
    chunks only from the listed sources. It was called ``discovery``: ``discovery=`` still
    works as a keyword, and ``options.discovery`` reads it.
    """

    token: bytes | None = declared(None, _TOKEN, repr=False)
    streams: int | None = declared(
        None,
        Setting(
            "parallel TCP streams per source",
            optional(integer(1, MAX_STREAMS)),
            "--streams",
            "STREAMS",
            unset="one per usable core, 2..8",
        ),
    )
    transports: tuple[str, ...] | None = declared(
        None,
        Setting(
            "transports to offer each source, best first, comma-separated (e.g. mooncake,tcp)",
            dataclasses.replace(optional(NAMES), example="tcp"),
            "--transport",
            "TRANSPORTS",
            unset="the best for the destination's device, then TCP",
        ),
    )
    mooncake: MooncakeOptions = declared(  # noqa: RUF009 (frozen: sharing it is safe)
        MooncakeOptions(), Group(skip={"offer": "a client proposes transports (--transport)"})
    )
    timeouts: Timeouts = declared(Timeouts(), Group())  # noqa: RUF009 (frozen: sharing it is safe)
    max_bytes: int | None = declared(
        None,
        Setting(
            "the most a pull into fresh tensors may allocate",
            optional(size(1)),
            "--max-bytes",
            no_key="a vLLM worker pulls into its model's own tensors and allocates nothing",
            unset="this machine's memory",
        ),
    )
    verify: bool = declared(
        True,
        Setting(
            "check every chunk against the server's digests",
            FLAG,
            "--no-verify",
            "VERIFY",
            cli_help="do not check chunks against the server's digests (only for measuring)",
        ),
    )
    max_sources: int = declared(
        DEFAULT_MAX_SOURCES,
        Setting(
            "sources delivering chunks at once; the others stand by, in order, for one that fails",
            integer(1),
            "--max-sources",
            "MAX_SOURCES",
        ),
    )
    placement: bool = declared(
        True,
        Setting(
            "true: the first source may place this relaying client behind peers ahead of it "
            "(relays) instead of serving it itself; false: take chunks only from the given "
            "sources",
            FLAG,
            "--no-placement",
            "PLACEMENT",
            formerly=("--no-discovery", "DISCOVERY", "discovery"),
            cli_help="take chunks only from the given sources, never from peers the first one "
            "places this replica behind",
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def discovery(self) -> bool:
        """The old name of ``placement``."""
        return self.placement

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
