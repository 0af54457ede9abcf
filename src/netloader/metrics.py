"""Prometheus metrics of this process, over HTTP at ``/metrics``, fed only by ``events``.

A server with ``metrics_port`` (``netloader serve --metrics-port P``, vLLM's ``METRICS_PORT``,
one port per rank: ``P + rank``) exposes them. Every server and client of the process counts
into one registry, subscribed once to the event seam; labels hold bounded values only (served
model names, refusal codes, the load path), never a peer's address.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from netloader import events
from netloader.errors import Code

#: Weights-phase seconds: from a fraction of a second (small models, fast peers) to minutes.
_PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
_CODES = frozenset(str(code) for code in Code)


class Metrics:
    """The process's collectors, and the event subscriber that feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.served = Counter(
            "netloader_served_bytes", "Weight bytes sent to peers", ["model"], registry=r
        )
        self.pulled = Counter(
            "netloader_pulled_bytes", "Weight bytes received and verified", ["model"], registry=r
        )
        self.refetched = Counter(
            "netloader_refetched_bytes", "Bytes asked again after a source failed", registry=r
        )
        self.active = Gauge("netloader_transfers_active", "Transfers being served", registry=r)
        self.queued = Gauge(
            "netloader_transfers_queued", "Clients waiting for a transfer slot", registry=r
        )
        self.transfers = Counter(
            "netloader_transfers", "Transfers served, by outcome", ["outcome"], registry=r
        )
        self.refusals = Counter(
            "netloader_refusals", "Pulls refused, by refusal code", ["code"], registry=r
        )
        self.relays = Gauge("netloader_relays", "Relays a server knows", ["model"], registry=r)
        self.loads = Counter(
            "netloader_loads", "Weights loads, by path (peer, storage)", ["path"], registry=r
        )
        self.weights_phase = Histogram(
            "netloader_weights_phase_seconds",
            "Seconds of a load's weights phase, by path",
            ["path"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        for code in _CODES:  # every code present from the start: rate() needs a first sample
            self.refusals.labels(code)

    def observe(self, event: events.Event) -> None:
        match event:
            case events.ChunkSent(model=model, nbytes=nbytes):
                self.served.labels(model).inc(nbytes)
            case events.ChunkReceived(model=model, nbytes=nbytes):
                self.pulled.labels(model).inc(nbytes)
            case events.Pulled(refetched=refetched):
                self.refetched.inc(refetched)
            case events.PullAccepted(delivers=True):
                self.active.inc()
            case events.TransferDone(ok=ok):
                self.active.dec()
                self.transfers.labels("verified" if ok else "failed").inc()
            case events.PullRefused(code=code):
                self.refusals.labels(code if code in _CODES else "other").inc()
            case events.Queued():
                self.queued.inc()
            case events.QueueLeft():
                self.queued.dec()
            case events.RelayJoined(model=model):
                self.relays.labels(model).inc()
            case events.RelayLeft(model=model):
                self.relays.labels(model).dec()
            case events.WeightsLoaded(path=path, seconds=seconds):
                self.loads.labels(path).inc()
                self.weights_phase.labels(path).observe(seconds)


_lock = threading.Lock()
_metrics: Metrics | None = None
_exposed: dict[tuple[str, int], Any] = {}


def metrics() -> Metrics:
    """The process's metrics, subscribed to the event seam on first use."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
            events.subscribe(_metrics.observe)
        return _metrics


def expose(host: str, port: int) -> None:
    """Serve the metrics at ``http://host:port/metrics`` (once per address; OSError if the
    port is taken)."""
    registry = metrics().registry
    with _lock:
        if (host, port) not in _exposed:
            _exposed[(host, port)] = start_http_server(port, addr=host, registry=registry)


def stop(host: str, port: int) -> None:
    """Stop serving the metrics at ``host:port`` (the counts stay)."""
    with _lock:
        exposed = _exposed.pop((host, port), None)
    if exposed is not None:
        server, thread = exposed
        server.shutdown()
        server.server_close()
        thread.join()
