"""The client: pulls one rank's tensors from the first source that can deliver them.

With ``into`` the bytes land directly in the caller's tensors (after the server agreed that
names, shapes and dtypes match); without it, tensors are allocated from the server's manifest,
after checking its total size against ``max_bytes``. Any failure raises a ``PullError`` whose
``partial`` flag tells whether the caller's tensors were already written to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from netloader import auth
from netloader.errors import (
    AllSourcesFailed,
    ConfigError,
    IntegrityError,
    PeerClosed,
    ProtocolError,
    PullError,
    Refused,
    SourceUnreachable,
    TransferTimeout,
    check_seconds,
)
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.plan import Plan
from netloader.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Channel,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    gc_paused,
)
from netloader.tensors import flat_bytes
from netloader.transport import TRANSPORTS, Incoming, preferred
from netloader.transport.tcp import tune

log = logging.getLogger("netloader.client")

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 30.0
MAX_DEFAULT_STREAMS = 8


def default_streams() -> int:
    """Parallel TCP streams to ask for: one per usable core, at least 2, at most 8.

    On loopback every stream costs a core for the kernel's copy; over a real network more
    streams than cores still help to fill a fat link. The server caps it by the chunk count.
    """
    return max(2, min(MAX_DEFAULT_STREAMS, len(os.sched_getaffinity(0))))


@dataclass
class PullResult:
    tensors: dict[str, torch.Tensor]
    source: str
    total_bytes: int
    seconds: float
    transport: str
    streams: int

    @property
    def gbps(self) -> float:
        return self.total_bytes / 1e9 / max(self.seconds, 1e-9)


def parse_source(source: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ConfigError names the bad value."""
    if not isinstance(source, str):
        raise ConfigError(f"a source must be a 'host:port' string, got {source!r}")
    host, sep, port = source.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"source {source!r} is not 'host:port' with a port in 1..65535")
    return host, int(port)


def pull(
    sources: str | Sequence[str],
    identity: Identity,
    into: Mapping[str, torch.Tensor] | None = None,
    *,
    device: str | torch.device = "cpu",
    token: bytes | None = None,
    streams: int | None = None,
    transports: Sequence[str] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    max_bytes: int | None = None,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
    on_accept: Callable[[Accept], None] | None = None,
    allocate: Callable[[Manifest], Mapping[str, torch.Tensor]] | None = None,
) -> PullResult:
    """Pull ``identity``'s tensors from the first of ``sources`` that delivers them.

    ``into``: existing tensors to fill in place (names, shapes and dtypes must match the
    server's). Without it, fresh tensors are allocated on ``device``, at most ``max_bytes`` in
    total (default: this machine's physical memory for CPU), or taken from
    ``allocate(manifest)`` once the server's manifest is known (e.g. views of a file being
    written; the callback bounds the size itself). ``progress`` receives byte counts as chunks
    land; ``on_accept`` sees the server's Accept before any weight moves.
    """
    if isinstance(sources, str):
        sources = [sources]
    targets = [(s, *parse_source(s)) for s in sources]
    if not targets:
        raise ConfigError("no sources given")
    streams = streams or default_streams()
    if not 1 <= streams <= 64:
        raise ConfigError(f"streams must be in 1..64, got {streams}")
    check_seconds(
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
    )
    for name in transports or ():
        if name not in TRANSPORTS:
            raise ConfigError(f"unknown transport {name!r}; known: {sorted(TRANSPORTS)}")
    want = Manifest.of(into) if into is not None else None
    dev = _device_of(into) if into else torch.device(device)
    offered = list(transports) if transports else preferred(dev)
    errors: list[PullError] = []
    for source, host, port in targets:
        try:
            attempt = _Attempt(
                source,
                host,
                port,
                identity,
                token,
                connect_timeout,
                handshake_timeout,
                idle_timeout,
            )
            with gc_paused():  # a blocking load: a full collection would only stall it
                return attempt.run(
                    want,
                    into,
                    dev,
                    offered,
                    streams,
                    max_bytes,
                    verify,
                    progress,
                    on_accept,
                    allocate,
                )
        except PullError as exc:
            exc.source = source
            log.info("source failed: %s", exc)
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise AllSourcesFailed(errors)


def info(
    source: str,
    *,
    token: bytes | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> InfoReply:
    """What ``source`` serves (identity, tensor count, bytes), without moving weights."""
    host, port = parse_source(source)
    check_seconds(connect_timeout=connect_timeout, timeout=timeout)
    attempt = _Attempt(source, host, port, None, token, connect_timeout, timeout, timeout)
    try:
        return attempt.info()
    except PullError as exc:
        exc.source = source
        raise


class _Attempt:
    """One try against one source: connect, handshake, transfer, report."""

    def __init__(
        self,
        source: str,
        host: str,
        port: int,
        identity: Identity | None,
        token: bytes | None,
        connect_timeout: float,
        handshake_timeout: float,
        idle_timeout: float,
    ):
        self.source, self.host, self.port = source, host, port
        self.identity = identity
        self.token = token
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.idle = idle_timeout

    def _connect(self) -> tuple[Channel, Hello, float]:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise SourceUnreachable(f"cannot connect: {exc.strerror or exc}") from None
        tune(sock)
        channel = Channel(sock, self.idle)
        deadline = time.monotonic() + self.handshake_timeout
        hello = self._recv(channel, Hello, deadline=deadline)
        assert isinstance(hello, Hello)
        if hello.protocol != PROTOCOL_VERSION:
            sock.close()
            raise Refused(
                f"server speaks protocol {hello.protocol}, this client {PROTOCOL_VERSION}",
                code="protocol",
            )
        if hello.auth and self.token is None:
            sock.close()
            raise Refused(
                "server requires a shared token; give one with --token-file, NETLOADER_TOKEN or TOKEN_FILE",
                code="auth",
            )
        if self.token is not None and not hello.auth:
            sock.close()
            raise Refused(
                "a token was given but the server does not authenticate; refusing to trust it",
                code="auth",
            )
        return channel, hello, deadline

    def _recv(self, channel: Channel, *expected: type, deadline: float) -> object:
        """Receive a handshake message; turn low-level failures into PullErrors."""
        try:
            msg = channel.recv(*expected, Refuse, deadline=deadline)
        except TimeoutError:
            raise TransferTimeout(
                f"no answer within the handshake limit ({self.handshake_timeout:g} s)"
            ) from None
        except ProtocolError as exc:
            raise PullError(f"not a valid netloader answer: {exc}") from None
        except OSError as exc:
            raise PeerClosed(f"connection lost during handshake: {exc}") from None
        if isinstance(msg, Refuse):
            raise Refused(f"refused: {msg.reason}", code=msg.code)
        return msg

    def _proof(self, *parts: str) -> str | None:
        return None if self.token is None else auth.mac(self.token, "client", *parts)

    def _check_server(self, proof: str | None, *parts: str) -> None:
        if self.token is not None and not auth.check(self.token, proof, "server", *parts):
            raise Refused("server failed to prove it knows the token; not trusting it", code="auth")

    def info(self) -> InfoReply:
        channel, hello, deadline = self._connect()
        try:
            nonce = auth.new_nonce()
            channel.send(
                InfoRequest(PROTOCOL_VERSION, nonce, self._proof("info", hello.nonce, nonce)),
                deadline,
            )
            reply = self._recv(channel, InfoReply, deadline=deadline)
            assert isinstance(reply, InfoReply)
            self._check_server(reply.mac, "info", nonce, hello.nonce)
            return reply
        finally:
            channel.sock.close()

    def run(
        self,
        want: Manifest | None,
        into: Mapping[str, torch.Tensor] | None,
        device: torch.device,
        transports: list[str],
        streams: int,
        max_bytes: int | None,
        verify: bool,
        progress: Callable[[int], None] | None,
        on_accept: Callable[[Accept], None] | None,
        allocate: Callable[[Manifest], Mapping[str, torch.Tensor]] | None = None,
    ) -> PullResult:
        assert self.identity is not None
        channel, hello, deadline = self._connect()
        inc: Incoming | None = None
        try:
            nonce = auth.new_nonce()
            request = PullRequest(
                PROTOCOL_VERSION,
                self.identity,
                want,
                transports,
                streams,
                nonce,
                self._proof("pull", hello.nonce, nonce),
            )
            channel.send(request, deadline)
            accept = self._recv(channel, Accept, deadline=deadline)
            assert isinstance(accept, Accept)
            self._check_server(accept.mac, "pull", nonce, hello.nonce, accept.session)
            self._check_accept(accept, want, transports)
            if on_accept is not None:
                on_accept(accept)
            if into is not None:
                tensors = dict(into)
            elif allocate is not None:
                tensors = dict(allocate(accept.manifest))
                if Manifest.of(tensors) != accept.manifest:
                    raise ValueError("allocate() returned tensors that differ from the manifest")
            else:
                tensors = _allocate(accept, device, max_bytes)
            ordered = [tensors[s.name] for s in accept.manifest.specs]
            buffers, scratch = _destinations(ordered, accept.aliases)
            plan = Plan([b.numel() for b in buffers], accept.chunk_size)
            if accept.digests is not None and len(accept.digests) != plan.num_chunks:
                raise PullError(
                    f"server sent {len(accept.digests)} digests for {plan.num_chunks} chunks"
                )
            inc = Incoming(
                self.host,
                self.port,
                accept.session,
                accept.streams,
                plan,
                buffers,
                accept.digests if verify else None,
                self.idle,
                accept.offer,
                progress,
            )
            start = time.perf_counter()
            try:
                TRANSPORTS[accept.transport]().receive(inc)
            except (PeerClosed, TransferTimeout) as exc:
                raise _explained(channel, exc) from None
            _finish(ordered, accept.aliases, scratch)
            seconds = time.perf_counter() - start
            _try(channel, Done(True))
            result = PullResult(
                tensors, self.source, plan.total_bytes, seconds, accept.transport, accept.streams
            )
            log.info(
                "pulled %s rank %d from %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
                self.identity.model,
                self.identity.rank,
                self.source,
                result.total_bytes / 1e9,
                seconds,
                result.gbps,
                result.transport,
                result.streams,
            )
            return result
        except PullError as exc:
            exc.partial = exc.partial or (inc is not None and inc.wrote)
            code = "integrity" if isinstance(exc, IntegrityError) else ""
            _try(channel, Done(False, str(exc)[:1000], code))
            if code:  # let the server act on it (re-check itself) before anyone pulls again
                _wait_closed(channel.sock, 10.0)
            raise
        finally:
            channel.sock.close()

    def _check_accept(self, accept: Accept, want: Manifest | None, transports: list[str]) -> None:
        """Never trust the server's own check: compare identity and manifest again here."""
        assert self.identity is not None
        problem = self.identity.mismatch(accept.identity, "client", "server")
        if problem is None and want is not None:
            reason = want.mismatch(accept.manifest, "client", "server")
            problem = ("manifest", f"tensor manifest differs: {reason}") if reason else None
        if problem is None and accept.transport not in transports:
            problem = ("transport", f"server chose transport {accept.transport!r}, not one offered")
        if problem is not None:
            raise Refused(
                f"server accepted a request it does not match: {problem[1]}", code=problem[0]
            )


def _device_of(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ConfigError(
            f"destination tensors are on several devices: {sorted(map(str, devices))}"
        )
    return devices.pop()


def _allocate(
    accept: Accept, device: torch.device, max_bytes: int | None
) -> dict[str, torch.Tensor]:
    total = accept.manifest.total_bytes
    limit = max_bytes if max_bytes is not None else _physical_memory()
    if total > limit:
        raise PullError(
            f"server offers {total / 1e9:.2f} GB, more than the allowed {limit / 1e9:.2f} GB (max_bytes)"
        )
    out: dict[str, torch.Tensor] = {}
    specs = accept.manifest.specs
    for i, spec in enumerate(specs):
        target = accept.aliases.get(i)
        out[spec.name] = (
            out[specs[target].name]
            if target is not None
            else torch.empty(spec.shape, dtype=spec.dtype, device=device)
        )
    return out


def _destinations(
    ordered: list[torch.Tensor], aliases: dict[int, int]
) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Flat byte destinations per slot; non-contiguous tensors get a contiguous scratch copy."""
    buffers, scratch = [], {}
    for i, t in enumerate(ordered):
        if i in aliases:
            buffers.append(torch.empty(0, dtype=torch.uint8))
        elif t.is_contiguous():
            buffers.append(flat_bytes(t))
        else:
            scratch[i] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            buffers.append(flat_bytes(scratch[i]))
    return buffers, scratch


def _finish(
    ordered: list[torch.Tensor], aliases: dict[int, int], scratch: dict[int, torch.Tensor]
) -> None:
    with torch.no_grad():
        for i, tmp in scratch.items():
            ordered[i].copy_(tmp)
        for i, j in aliases.items():
            dst, src = ordered[i], ordered[j]
            if not (dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()):
                dst.copy_(src)


def _explained(channel: Channel, exc: PullError) -> PullError:
    """When the data plane breaks, the server may have said why on the control connection."""
    try:
        msg = channel.recv(Refuse, deadline=time.monotonic() + 1.0)
    except (OSError, ProtocolError):
        return exc
    assert isinstance(msg, Refuse)
    return Refused(f"refused: {msg.reason}", code=msg.code, partial=exc.partial)


def _wait_closed(sock: socket.socket, limit: float) -> None:
    """Read and discard until the peer closes the connection, at most ``limit`` seconds."""
    sock.settimeout(limit)
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def _try(channel: Channel, msg: Done) -> None:
    with contextlib.suppress(OSError):
        channel.send(msg)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
