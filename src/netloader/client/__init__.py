"""The client: pulls one rank's tensors from the first source that can deliver them.

With ``into`` the bytes land directly in the caller's tensors (after the server agreed that
names, shapes and dtypes match); without it, tensors are allocated from the server's manifest,
after checking its total size against ``max_bytes``. Any failure raises a ``PullError`` whose
``partial`` flag tells whether the caller's tensors were already written to.

Its parts: ``control`` (the control connection: handshake, checks, verdict) and ``destination``
(where the bytes land); the transport moves the bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from netloader.client.control import Control, Endpoint
from netloader.client.destination import Destination, device_of, prepare
from netloader.errors import (
    AllSourcesFailed,
    ConfigError,
    PeerClosed,
    PullError,
    TransferTimeout,
    as_pull_error,
)
from netloader.identity import Identity
from netloader.manifest import Manifest
from netloader.options import (
    CLIENT_HANDSHAKE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    PullHooks,
    PullOptions,
    Timeouts,
    with_keywords,
)
from netloader.protocol import PROTOCOL_VERSION, Accept, InfoReply, PullRequest, gc_paused
from netloader.transport import TRANSPORTS, Incoming, preferred

log = logging.getLogger("netloader.client")

_HOOKS = ("progress", "on_accept", "allocate")


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
    endpoint = Endpoint.parse(source)
    return endpoint.host, endpoint.port


def pull(
    sources: str | Sequence[str],
    identity: Identity,
    into: Mapping[str, torch.Tensor] | None = None,
    options: PullOptions | None = None,
    hooks: PullHooks | None = None,
    **keywords: Any,
) -> PullResult:
    """Pull ``identity``'s tensors from the first of ``sources`` that delivers them.

    ``into``: existing tensors to fill in place (names, shapes and dtypes must match the
    server's). Without it, fresh tensors are allocated on ``device`` (a keyword, default CPU),
    at most ``max_bytes`` in total, or taken from ``allocate(manifest)``. ``options`` holds the
    settings (see ``PullOptions``) and ``hooks`` what the caller sees of the pull (see
    ``PullHooks``); keyword arguments set single fields of either (``token=``, ``streams=``,
    ``idle_timeout=``, ``progress=``, ...).
    """
    device = torch.device(keywords.pop("device", "cpu"))
    hooks = with_keywords(
        hooks or PullHooks(), {k: keywords.pop(k) for k in _HOOKS if k in keywords}
    )
    options = with_keywords(options or PullOptions(), keywords)
    endpoints = [Endpoint.parse(s) for s in ([sources] if isinstance(sources, str) else sources)]
    if not endpoints:
        raise ConfigError("no sources given")
    for name in options.transports or ():
        if name not in TRANSPORTS:
            raise ConfigError(f"unknown transport {name!r}; known: {sorted(TRANSPORTS)}")
    job = _Job(identity, into, device, options, hooks)
    errors: list[PullError] = []
    for endpoint in endpoints:
        try:
            with gc_paused():  # a blocking load: a full collection would only stall it
                return job.pull_from(endpoint)
        except PullError as exc:
            exc.source = endpoint.text
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
    timeout: float = CLIENT_HANDSHAKE_TIMEOUT,
) -> InfoReply:
    """What ``source`` serves (identity, tensor count, bytes), without moving weights."""
    endpoint = Endpoint.parse(source)
    timeouts = Timeouts(connect=connect_timeout, handshake=timeout, idle=timeout)
    try:
        with Control.open(endpoint, timeouts, token) as control:
            return control.ask_info()
    except PullError as exc:
        exc.source = source
        raise


class _Job:
    """One pull's fixed inputs, tried against one source after another."""

    def __init__(
        self,
        identity: Identity,
        into: Mapping[str, torch.Tensor] | None,
        device: torch.device,
        options: PullOptions,
        hooks: PullHooks,
    ):
        self.identity = identity
        self.into = into
        self.want = Manifest.of(into) if into is not None else None
        self.device = device_of(into) if into else device
        self.options = options
        self.hooks = hooks
        self.offered = list(options.transports or preferred(self.device))

    def pull_from(self, endpoint: Endpoint) -> PullResult:
        """Handshake with ``endpoint``, receive every chunk, and tell the server how it went."""
        with Control.open(endpoint, self.options.timeouts, self.options.token) as control:
            inc: Incoming | None = None
            try:
                accept = control.ask_pull(self._request())
                if self.hooks.on_accept is not None:
                    self.hooks.on_accept(accept)
                dest = prepare(
                    accept, self.into, self.hooks.allocate, self.device, self.options.max_bytes
                )
                inc = self._incoming(endpoint, accept, dest)
                start = time.perf_counter()
                self._receive(control, accept, inc)
                dest.finish()
                seconds = time.perf_counter() - start
            except PullError as exc:
                exc.partial = exc.partial or (inc is not None and inc.wrote)
                control.done(exc)
                raise
            control.done()
        result = PullResult(
            dest.tensors,
            endpoint.text,
            inc.plan.total_bytes,
            seconds,
            accept.transport,
            inc.streams,
        )
        log.info(
            "pulled %s rank %d from %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
            *(self.identity.model, self.identity.rank, result.source, result.total_bytes / 1e9),
            *(seconds, result.gbps, result.transport, result.streams),
        )
        return result

    def _request(self) -> PullRequest:
        return PullRequest(
            protocol=PROTOCOL_VERSION,
            identity=self.identity,
            manifest=self.want,
            transports=self.offered,
            streams=self.options.stream_count(),
            nonce="",
        )

    def _incoming(self, endpoint: Endpoint, accept: Accept, dest: Destination) -> Incoming:
        return Incoming(
            host=endpoint.host,
            port=endpoint.port,
            session=accept.session,
            streams=accept.streams,
            plan=dest.plan,
            buffers=dest.buffers,
            digests=accept.digests if self.options.verify else None,
            idle=self.options.timeouts.idle,
            offer=accept.offer,
            progress=self.hooks.progress,
        )

    def _receive(self, control: Control, accept: Accept, inc: Incoming) -> None:
        try:
            TRANSPORTS[accept.transport]().receive(inc)
        except Exception as exc:
            error = as_pull_error(exc, "transfer", partial=inc.wrote)
            if isinstance(error, PeerClosed | TransferTimeout):
                error = control.explain(error)
            raise error from None
