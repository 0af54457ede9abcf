"""Parallel streams of one transfer, and the data connections that reach a server for them.

``Streams`` runs each stream in its own thread with a watchdog; ``Attachments`` holds the data
connections the server's listener hands a transfer (its session id is their ticket) until its
streams take them; ``AttachedSending`` is the server's side of a transfer whose streams are such
connections (TCP, CUDA IPC).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable

from netloader.errors import ProtocolError, PullError, TensorsChanged, Withdrawn
from netloader.sockets import close, shutdown
from netloader.transport.base import Outgoing, Sending

#: One stream's work on its connection; it calls ``mark()`` after every chunk.
Work = Callable[[socket.socket, Callable[[], None]], None]


class Attachments:
    """Data connections for one transfer, at most ``expected``, each handed on in arrival order."""

    def __init__(self) -> None:
        self.expected = 0
        self._lock = threading.Lock()
        self._arrived: queue.Queue[socket.socket] = queue.Queue()
        self._attached: list[socket.socket] = []
        #: The index the client gave each data connection (its StreamAttach).
        self._index: dict[socket.socket, int] = {}

    def expect(self, count: int) -> None:
        self.expected = count

    def attach(self, sock: socket.socket, index: int) -> bool:
        """Take data connection ``index``; False if it is not one this transfer expects."""
        with self._lock:
            if (
                index >= self.expected
                or len(self._attached) >= self.expected
                or index in self._index.values()  # each index once
            ):
                return False
            self._attached.append(sock)
            self._index[sock] = index
        self._arrived.put(sock)
        return True

    def index_of(self, sock: socket.socket) -> int:
        """The index the client gave data connection ``sock``."""
        with self._lock:
            return self._index[sock]

    def next(
        self, idle: float, client_gone: Callable[[], bool], cancelled: threading.Event
    ) -> socket.socket:
        """The next data connection. A client that dies before attaching them all must not
        hold its slot for the idle limit."""
        deadline = time.monotonic() + idle
        while (left := deadline - time.monotonic()) > 0:
            try:
                return self._arrived.get(timeout=min(left, 0.25))
            except queue.Empty:
                if client_gone() or cancelled.is_set():
                    raise ConnectionResetError("client left before attaching its streams") from None
        raise TimeoutError(f"client attached fewer than {self.expected} streams")

    def close(self) -> None:
        """Close every connection taken, and take no more; safe to call more than once."""
        with self._lock:
            attached, self.expected = list(self._attached), 0
        for sock in attached:
            close(sock)


class AttachedSending(Sending):
    """A transfer whose streams are data connections to the server's own port."""

    def __init__(self, out: Outgoing):
        super().__init__(out)
        #: Data connections the listener handed over, in arrival order; each starts at once.
        self.attachments = Attachments()

    def offer(self) -> dict[str, object]:
        self.attachments.expect(self.out.streams)
        return {}

    def attach(self, sock: socket.socket, index: int) -> bool:
        return self.attachments.attach(sock, index)

    def close(self) -> None:
        self.attachments.close()

    def run_streams(self, work: Work) -> None:
        """Run ``work`` on each data connection as it arrives, until every stream is done."""
        out = self.out
        try:
            Streams(out.streams, out.idle, out.cancelled).run(
                lambda index: self.attachments.next(out.idle, out.client_gone, out.cancelled),
                work,
            )
        finally:
            self.close()


class Streams:
    """``count`` streams, each in its own thread, each starting as soon as its own connection
    is ready, watched for progress.

    ``work(sock, mark)`` calls ``mark()`` after every chunk (and whenever it is legitimately
    waiting); the watchdog stops everything when a stream makes no mark for ``idle`` seconds,
    so a peer trickling a byte at a time is dropped like a silent one. On the first failure
    every stream is stopped, and ``run`` waits for all of them before it re-raises the failure
    that explains the stop. All sockets are closed on return."""

    def __init__(self, count: int, idle: float, cancelled: threading.Event):
        self.count = count
        self.idle = idle
        self.cancelled = cancelled
        self.errors: list[BaseException] = []
        self.socks: list[socket.socket] = []
        self.marks = [time.monotonic()] * count
        self.lock = threading.Lock()

    def run(self, open_stream: Callable[[int], socket.socket], work: Work) -> None:
        threads = [
            threading.Thread(
                target=self._one, args=(i, open_stream, work), name="netloader-stream", daemon=True
            )
            for i in range(self.count)
        ]
        try:
            for t in threads:
                t.start()
            self._watch(threads)
        finally:
            for s in self.socks:
                close(s)
        self._raise()

    def _one(self, index: int, open_stream: Callable[[int], socket.socket], work: Work) -> None:
        def mark() -> None:
            self.marks[index] = time.monotonic()

        try:
            sock = open_stream(index)
            with self.lock:
                self.socks.append(sock)
                if self.cancelled.is_set():
                    shutdown(sock)
            mark()
            work(sock, mark)
        except BaseException as exc:
            self.stop(exc)

    def _watch(self, threads: list[threading.Thread]) -> None:
        while running := [t for t in threads if t.is_alive()]:
            running[0].join(timeout=min(0.5, self.idle / 4))
            now = time.monotonic()
            stale = [
                i for i, t in enumerate(threads) if t.is_alive() and now - self.marks[i] > self.idle
            ]
            if stale and not self.cancelled.is_set():
                self.stop(TimeoutError(f"no chunk completed for {self.idle:g} s"))

    def stop(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.cancelled.set()
        with self.lock:
            for s in self.socks:  # unblock the other streams at once
                shutdown(s)

    def _raise(self) -> None:
        # Prefer the error that explains the stop over the closures it caused in other streams.
        for exc in self.errors:
            if isinstance(
                exc, PullError | TensorsChanged | Withdrawn | ProtocolError | TimeoutError
            ):
                raise exc
        if self.errors:
            raise self.errors[0]
