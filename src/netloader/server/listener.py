"""The listening socket: accepts connections and runs each one's handler in its own thread.

It bounds how many connections may be in their handshake at once (more are turned away at
once), tracks its threads and open connections, and stops them all on ``close()``. What a
connection is for is the handler's business.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from netloader.sockets import peer_name, shutdown, tune

log = logging.getLogger("netloader.server")

MAX_PENDING = 64  # connections still in their handshake; more are turned away at once


class Connection:
    """One accepted connection, handed to the handler. ``handshake_over()`` frees its place
    among the pending handshakes (a connection that became a transfer no longer counts)."""

    def __init__(self, sock: socket.socket, peer: str, pending: threading.BoundedSemaphore):
        self.sock = sock
        self.peer = peer
        self._pending: threading.BoundedSemaphore | None = pending

    def handshake_over(self) -> None:
        if self._pending is not None:
            self._pending.release()
            self._pending = None


#: Handles one connection; returns True when someone else now owns the socket.
Handler = Callable[[Connection], bool]


class Listener:
    def __init__(self, sock: socket.socket, handler: Handler, closing: threading.Event):
        self.sock = sock
        self.handler = handler
        self.closing = closing
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    @classmethod
    def bind(cls, host: str, port: int, handler: Handler, closing: threading.Event) -> Listener:
        try:
            sock = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        return cls(sock, handler, closing)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def start(self) -> None:
        self.spawn(self._accept_loop, "netloader-accept")

    def spawn(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a daemon thread that ``close()`` waits for."""

        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        """Stop accepting, shut every connection still in its handshake, wait for threads."""
        shutdown(self.sock)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            shutdown(conn)
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self.closing.is_set():
            try:
                sock, address = self.sock.accept()
            except OSError:
                if self.closing.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            peer = peer_name(address)
            if not self._pending.acquire(blocking=False):
                log.warning("turning away %s: %d handshakes already in progress", peer, MAX_PENDING)
                sock.close()
                continue
            with self._lock:
                self._conns.add(sock)
            conn = Connection(sock, peer, self._pending)
            self.spawn(lambda conn=conn: self._serve(conn), "netloader-conn")

    def _serve(self, conn: Connection) -> None:
        kept = False
        try:
            tune(conn.sock)
            kept = self.handler(conn)
        finally:
            conn.handshake_over()
            with self._lock:
                self._conns.discard(conn.sock)
            if not kept:
                conn.sock.close()
