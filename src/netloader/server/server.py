"""The server: serves one rank's models from background threads of a process that keeps
working (see the package's docstring for its parts)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from netloader import metrics
from netloader.artifacts import VLLM_TORCH_COMPILE
from netloader.events import Count
from netloader.identity import Identity
from netloader.options import ServeOptions, with_keywords
from netloader.pacing import Pacer
from netloader.server.admission import Admission
from netloader.server.artifacts import Shelf
from netloader.server.catalog import Catalog, ServedModel
from netloader.server.dispatch import Dispatcher
from netloader.server.handshake import Gate
from netloader.server.integrity import Integrity
from netloader.server.listener import Listener
from netloader.server.relays import Relays
from netloader.server.session import SessionContext
from netloader.snapshot import Snapshot
from netloader.sockets import advertised
from netloader.transport import offered

log = logging.getLogger("netloader.server")

PORT_RANGE = range(1024, 65536)


class Server:
    """Serves ``tensors`` (one rank of ``identity``) to netloader clients, and any further
    models given to ``add()`` on the same port.

    ``options`` says where to listen and what to allow (see ``ServeOptions``); keyword
    arguments set single fields of it (``listen_port=7000``, ``max_clients=2``,
    ``idle_timeout=10``). The server listens on ``listen_port + identity.rank``; a port outside
    1024..65535 means no listener (a warning is logged and ``address`` stays None).
    ``tensors=None`` makes a server that waits for ``provide()`` (a relay).

    ``identity``, ``snapshot``, ``peers``, ``unavailable``, ``provide()`` and ``withdraw()``
    speak of the first model; ``model(name)`` gives any model's own ``ServedModel``.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | Snapshot | None,
        identity: Identity,
        options: ServeOptions | None = None,
        **keywords: Any,
    ):
        self.options = options = with_keywords(options or ServeOptions(), keywords)
        self.catalog = Catalog()
        #: The transports this server offers, each told about every snapshot it serves.
        self.engines = offered(options)
        self.gate = Gate(options.token, self.engines)
        self.closing = threading.Event()
        rate = options.max_upload_rate
        #: Transfers of every model that the client verified.
        self.transfers = Count()
        self.context = SessionContext(
            host=options.host,
            timeouts=options.timeouts,
            max_streams=options.limits.max_streams,
            verify_before_send=options.verify_before_send,
            pacer=Pacer(rate) if rate else None,  # the upload cap, shared by every transfer
            gate=self.gate,
            closing=self.closing,
            transfers=self.transfers,
        )
        #: The compile artifacts it offers (``--compile-cache``; a vLLM worker adds its own).
        self.shelf = Shelf(options.artifacts, options.token is not None)
        if options.compile_cache:
            self.shelf.add_root(VLLM_TORCH_COMPILE, options.compile_cache)
        admission = Admission(options.limits, self.closing)
        self.dispatcher = Dispatcher(
            self.context, self.catalog, admission, lambda: self._first, self.shelf
        )
        self.address: str | None = None
        self._metrics_port: int | None = None
        self._listener: Listener | None = None
        self._lock = threading.Lock()
        self._kept: list[socket.socket] = []
        self._first = self.add(tensors, identity)

    def add(
        self, tensors: Mapping[str, torch.Tensor] | Snapshot | None, identity: Identity
    ) -> ServedModel:
        """Serve ``tensors`` as ``identity`` too, on the same port (``None``: wait for the
        entry's ``provide()``, a relay). ValueError if a model of that name is served already."""
        snapshot = (
            tensors
            if tensors is None or isinstance(tensors, Snapshot)
            else Snapshot(tensors, chunk_size=self.options.chunk_size)
        )
        entry = self.catalog.add(ServedModel(identity, snapshot, self._on_provide))
        if snapshot is not None:
            self._installed(entry)
        return entry

    def model(self, name: str | None = None) -> ServedModel:
        """The entry of the model called ``name`` (KeyError if none); None: the first model."""
        return self._first if name is None else self.catalog.get(name)

    # --- the first model (what a one-model server serves) --------------------------------

    @property
    def identity(self) -> Identity:
        return self._first.identity

    @property
    def snapshot(self) -> Snapshot | None:
        return self._first.snapshot

    @property
    def relays(self) -> Relays:
        return self._first.relays

    @property
    def peers(self) -> Relays:
        """The old name of ``relays``."""
        return self._first.relays

    @property
    def served(self) -> int:
        """Transfers of every model that the client verified."""
        return self.transfers.value

    @property
    def integrity(self) -> Integrity:
        return self._first.integrity

    def provide(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` as the first model from now on (see ``ServedModel.provide``)."""
        self._first.provide(snapshot)

    def withdraw(self, reason: str) -> None:
        """Stop serving the first model (see ``ServedModel.withdraw``)."""
        self._first.withdraw(reason)

    @property
    def unavailable(self) -> str | None:
        """When set, every pull of the first model is refused with this reason."""
        return self._first.unavailable

    @unavailable.setter
    def unavailable(self, reason: str | None) -> None:
        self._first.unavailable = reason

    def keep(self, sock: socket.socket) -> None:
        """Hold ``sock`` open until this server closes: a relay's membership at its source,
        which forgets the relay when it closes."""
        with self._lock:
            self._kept.append(sock)

    def _on_provide(self, entry: ServedModel) -> None:
        self._installed(entry)

    def _installed(self, entry: ServedModel) -> None:
        """``entry`` has a snapshot from now on: prepare it for every transport, announce it."""
        assert entry.snapshot is not None
        for engine in self.engines:
            engine.register(entry.snapshot)
        if self.address:
            self._announce(entry)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Server:
        if self._listener is not None:
            raise RuntimeError("server already started")
        base, rank = self.options.listen_port, self.identity.rank
        port = 0 if base is None else base + rank
        if base is not None and port not in PORT_RANGE:
            log.warning(
                "not listening: port %d (listen_port %d + rank %d) is outside %d..%d",
                *(port, base, rank, PORT_RANGE.start, PORT_RANGE.stop - 1),
            )
            return self
        self._listener = Listener.bind(
            self.options.host, port, self.dispatcher.handle, self.closing
        )
        self.address = f"{advertised(self.options.host)}:{self._listener.port}"
        self._listener.start()
        for entry in self.catalog:
            if entry.snapshot is not None:
                self._announce(entry)
        if self.options.output_prefix:
            write_address(self.options.output_prefix, rank, self.address)
        self._expose_metrics()
        return self

    def _expose_metrics(self) -> None:
        """With ``metrics_port``: the process's metrics on ``metrics_port + rank``."""
        base = self.options.metrics_port
        if base is None:
            return
        port = base + self.identity.rank
        if port not in PORT_RANGE:
            log.warning(
                "serving no metrics: port %d (metrics_port %d + rank %d) is outside %d..%d",
                *(port, base, self.identity.rank, PORT_RANGE.start, PORT_RANGE.stop - 1),
            )
            return
        metrics.expose(self.options.host, port)
        self._metrics_port = port

    def close(self) -> None:
        """Stop listening, drop every connection and wait for the server's threads."""
        self.closing.set()
        if self._metrics_port is not None:
            metrics.stop(self.options.host, self._metrics_port)
        self.dispatcher.sessions.abort_all()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            kept, self._kept = self._kept, []
        for sock in kept:
            sock.close()

    def __enter__(self) -> Server:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _announce(self, entry: ServedModel) -> None:
        assert entry.snapshot is not None
        ident = entry.identity
        if self.options.token is None:
            log.warning(
                "serving %s rank %d on %s without a token: anyone who can reach this port can "
                "read the weights",
                *(ident.model, ident.rank, self.address),
            )
        log.info(
            "serving %s (%s, rank %d: %d tensors, %.3f GB) on %s",
            *(ident.model, ident.layout, ident.rank, len(entry.snapshot.manifest)),
            *(entry.snapshot.plan.total_bytes / 1e9, self.address),
        )


def write_address(prefix: str, rank: int, address: str) -> Path:
    """Atomically write ``address`` to ``{prefix}{rank}.txt`` (temp file, then rename)."""
    path = Path(f"{prefix}{rank}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
