"""The client: pulls one rank's tensors from the sources that can deliver them.

With ``into`` the bytes land directly in the caller's tensors (after the server agreed that
names, shapes and dtypes match); without it, tensors are allocated from the server's manifest,
after checking its total size against ``max_bytes``. Any failure raises a ``PullError`` whose
``partial`` flag tells whether the caller's tensors were already written to.

Its parts, along the data path: ``control`` (one control connection: handshake, checks,
verdict), ``transfer`` (what the runs of one pull share: how to ask a source, and the context
fixed by the first Accept), ``schedule`` (several sources at once: which run, replacing those
that fail, errors and the result), ``source`` (one source's run), ``relay`` (serving onwards
what arrives, and membership at the first source), ``destination`` (where the bytes land),
``transports`` (the one place that meets the transport registry) and ``result``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from netloader import events
from netloader.client.control import Control, Endpoint
from netloader.client.destination import Landing, device_of
from netloader.client.names import resolve
from netloader.client.relay import Relaying
from netloader.client.result import PullResult
from netloader.client.schedule import pull_striped
from netloader.client.transfer import Job, Requests
from netloader.client.transports import Offer, check_known
from netloader.errors import ConfigError, PullError
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
from netloader.protocol import InfoReply, gc_paused

if TYPE_CHECKING:
    from netloader.server import Server

log = logging.getLogger("netloader.client")

_HOOKS = ("progress", "on_accept", "allocate")

__all__ = ["PullResult", "info", "parse_source", "pull", "status"]


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
    relay: Server | None = None,
    **keywords: Any,
) -> PullResult:
    """Pull ``identity``'s tensors from ``sources``: the first that accepts defines the content,
    and up to ``max_sources`` of them deliver chunks at once (see ``client.schedule``).

    ``into``: existing tensors to fill in place (names, shapes and dtypes must match the
    server's). Without it, fresh tensors are allocated on ``device`` (a keyword, default CPU),
    at most ``max_bytes`` in total, or taken from ``allocate(manifest)``. ``options`` holds the
    settings (see ``PullOptions``) and ``hooks`` what the caller sees of the pull (see
    ``PullHooks``); keyword arguments set single fields of either (``token=``, ``streams=``,
    ``idle_timeout=``, ``progress=``, ...).

    ``relay``: a started ``Server`` of this process with an entry for ``identity.model`` that
    waits for its weights (``Server(None, identity, ...)``, or ``server.add(None, identity)``
    for another model); it serves every chunk onwards as soon as it landed and was verified,
    and (with ``placement``) the first source learns its address and may send this client to
    peers ahead of it. If the pull fails that entry is withdrawn (the server's other models
    are untouched).
    """
    device = torch.device(keywords.pop("device", "cpu"))
    hooks = with_keywords(
        hooks or PullHooks(), {k: keywords.pop(k) for k in _HOOKS if k in keywords}
    )
    hooks = dataclasses.replace(hooks, progress=_observed(identity.model, hooks.progress))
    options = with_keywords(options or PullOptions(), keywords)
    given = [Endpoint.parse(s) for s in ([sources] if isinstance(sources, str) else sources)]
    if not given:
        raise ConfigError("no sources given")
    own = Endpoint.parse(relay.address) if relay is not None and relay.address else None
    endpoints = resolve(given, own)
    if not endpoints:
        raise ConfigError(
            f"no source left: {', '.join(e.text for e in given)} name only this client's own server"
        )
    check_known(options.transports)
    if relay is not None and identity.model not in relay.catalog:
        raise ConfigError(
            f"the relay server serves no model named {identity.model!r}; "
            "add it first: server.add(None, identity)"
        )
    if into:
        device = device_of(into)
    relaying = Relaying(relay, identity.model, options.placement)
    requests = Requests(
        identity=identity,
        manifest=Manifest.of(into) if into is not None else None,
        streams=options.stream_count(),
        offer=Offer(options.transports, device),
        advertise=relaying.advertise,
    )
    landing = Landing(into, hooks.allocate, device, options.max_bytes)
    job = Job(requests, options, hooks, landing)
    with gc_paused():  # a blocking load: a full collection would only stall it
        result = pull_striped(job, endpoints, relaying)
    events.emit(events.Pulled(identity.model, result.total_bytes, result.seconds, result.refetched))
    log.info(
        "pulled %s rank %d from %s: %.3f GB in %.2f s (%.2f GB/s) over %s x%d",
        *(identity.model, identity.rank, result.describe_sources(1e9, " GB")),
        *(result.total_bytes / 1e9, result.seconds, result.gbps, result.transport, result.streams),
    )
    return result


def _observed(model: str, progress: Callable[[int], None] | None) -> Callable[[int], None]:
    """The progress hook, with every verified chunk emitted as an event first."""

    def landed(nbytes: int) -> None:
        events.emit(events.ChunkReceived(model, nbytes))
        if progress is not None:
            progress(nbytes)

    return landed


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


def status(
    source: str,
    *,
    token: bytes | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = CLIENT_HANDSHAKE_TIMEOUT,
) -> dict[str, Any]:
    """What the server at ``source`` is doing (see ``server.status.report``)."""
    endpoint = Endpoint.parse(source)
    timeouts = Timeouts(connect=connect_timeout, handshake=timeout, idle=timeout)
    try:
        with Control.open(endpoint, timeouts, token) as control:
            return control.ask_status().status
    except PullError as exc:
        exc.source = source
        raise
