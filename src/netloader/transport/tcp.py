"""Weights over TCP: several parallel streams, vectored sends, reads straight into tensors.

Every data stream is its own TCP connection to the server's one port; its first frame names the
session. The server's stream threads take chunks from a shared counter (so a slow stream simply
carries fewer chunks) and send each as an 8-byte header (the chunk index) followed by the
chunk's bytes, read straight from the tensors. The client reads the header, then the bytes
straight into the destination tensors' own memory. Python never touches a weight byte.
"""

from __future__ import annotations

import itertools
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

import torch

from netloader.errors import (
    Code,
    ProtocolError,
    PullError,
    Refused,
    TensorsChanged,
)
from netloader.options import MAX_STREAMS
from netloader.protocol import Channel, Hello, Refuse, StreamAttach, encode
from netloader.sockets import close, connect, kernel_timeouts, shutdown
from netloader.transport.base import Incoming, Outgoing, Staging, Transport

CHUNK_HEADER = struct.Struct("!q")
END = -1  # this stream carries no more chunks
ERROR = -2  # a Refuse frame follows: the server stopped for a reason the client should know
IOV_MAX = 512  # below the kernel's 1024 iovec limit
LARGE = 256 << 10  # buffers at least this big get a system call of their own


class TcpTransport(Transport):
    name = "tcp"
    max_streams = MAX_STREAMS

    def __init__(self) -> None:
        self._expected = 0
        self._lock = threading.Lock()
        #: Data connections the listener handed over, in arrival order; each starts at once.
        self._arrived: queue.Queue[socket.socket] = queue.Queue()
        self._attached: list[socket.socket] = []

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        return True  # device tensors are staged through a chunk-sized host buffer

    # --- server ---------------------------------------------------------------------------

    def offer(self, out: Outgoing) -> dict[str, object]:
        self._expected = out.streams
        return {}

    def attach(self, sock: socket.socket, index: int) -> bool:
        with self._lock:
            if index >= self._expected or len(self._attached) >= self._expected:
                return False
            self._attached.append(sock)
        self._arrived.put(sock)
        return True

    def close(self) -> None:
        with self._lock:
            attached, self._expected = list(self._attached), 0
        for sock in attached:
            close(sock)

    def send(self, out: Outgoing) -> None:
        counter = itertools.count()
        lock = threading.Lock()

        def next_chunk() -> int | None:
            with lock:
                index = next(counter)
            return index if index < out.snapshot.plan.num_chunks else None

        try:
            _run_streams(
                out.streams,
                lambda index: self._wait_attached(out),
                lambda s, mark: _send_stream(s, out, next_chunk, mark),
                out.cancelled,
                out.idle,
            )
        finally:
            self.close()

    def _wait_attached(self, out: Outgoing) -> socket.socket:
        """The next data connection. A client that dies before attaching them all must not
        hold its slot for the idle limit."""
        deadline = time.monotonic() + out.idle
        while (left := deadline - time.monotonic()) > 0:
            try:
                return self._arrived.get(timeout=min(left, 0.25))
            except queue.Empty:
                if out.client_gone() or out.cancelled.is_set():
                    raise ConnectionResetError("client left before attaching its streams") from None
        raise TimeoutError(f"client attached fewer than {out.streams} streams")

    # --- client ---------------------------------------------------------------------------

    def receive(self, inc: Incoming) -> None:
        seen = bytearray(inc.plan.num_chunks)
        lock = threading.Lock()

        def claim(index: int) -> None:
            if not 0 <= index < inc.plan.num_chunks:
                raise ProtocolError(f"server sent chunk {index} of {inc.plan.num_chunks}")
            with lock:
                if seen[index]:
                    raise ProtocolError(f"server sent chunk {index} twice")
                seen[index] = 1

        _run_streams(
            inc.streams,
            lambda index: _attach(inc, index),
            lambda s, mark: _recv_stream(s, inc, claim, mark),
            threading.Event(),
            inc.idle,
        )
        missing = inc.plan.num_chunks - sum(seen)
        if missing:
            raise ConnectionResetError(f"server ended the transfer with {missing} chunk(s) unsent")


# --- one stream ---------------------------------------------------------------------------


def _send_stream(
    sock: socket.socket,
    out: Outgoing,
    next_chunk: Callable[[], int | None],
    mark: Callable[[], None],
) -> None:
    staging = Staging(out.snapshot.plan, out.snapshot.buffers)
    kernel_timeouts(sock, out.idle)
    while (index := next_chunk()) is not None:
        if out.cancelled.is_set():
            return
        views = staging.views(index, load=True)
        try:
            out.check(index, views)
        except TensorsChanged as exc:
            sock.sendall(CHUNK_HEADER.pack(ERROR) + encode(Refuse(Code.CHANGED, str(exc))))
            raise
        send_buffers(sock, [memoryview(CHUNK_HEADER.pack(index)), *views])
        mark()
    sock.sendall(CHUNK_HEADER.pack(END))


def _recv_stream(
    sock: socket.socket,
    inc: Incoming,
    claim: Callable[[int], None],
    mark: Callable[[], None],
) -> None:
    staging = Staging(inc.plan, inc.buffers)
    kernel_timeouts(sock, inc.idle)
    header = bytearray(CHUNK_HEADER.size)
    while True:
        recv_buffers(sock, [memoryview(header)])
        (index,) = CHUNK_HEADER.unpack(header)
        if index == END:
            return
        if index == ERROR:
            refusal = Channel(sock, inc.idle).recv(Refuse)
            raise Refused(refusal.reason, code=refusal.code, partial=inc.wrote)
        claim(index)
        views = staging.views(index, load=False)
        inc.wrote = True
        recv_buffers(sock, views)
        inc.verify(index, views)
        staging.store(index)
        inc.advance(inc.plan.chunk_bytes(index))
        mark()


def _attach(inc: Incoming, index: int) -> socket.socket:
    sock = connect(inc.host, inc.port, inc.idle)
    try:
        channel = Channel(sock, inc.idle)
        channel.recv(Hello)
        channel.send(StreamAttach(inc.session, index))
        return sock
    except BaseException:
        sock.close()
        raise


def _run_streams(
    count: int,
    open_stream: Callable[[int], socket.socket],
    work: Callable[[socket.socket, Callable[[], None]], None],
    cancelled: threading.Event,
    idle: float,
) -> None:
    """Open ``count`` streams and run ``work(sock, mark)`` on each in its own thread, each
    starting as soon as its own connection is ready. ``work`` calls ``mark()`` after every
    chunk; this thread watches those marks and stops everything when a stream completes no
    chunk for ``idle`` seconds: a peer trickling a byte at a time is dropped like a silent one.
    On the first failure every stream is stopped and that failure re-raised. All sockets are
    closed on return."""
    errors: list[BaseException] = []
    socks: list[socket.socket] = []
    marks = [time.monotonic()] * count
    lock = threading.Lock()

    def stop_all(exc: BaseException) -> None:
        errors.append(exc)
        cancelled.set()
        with lock:
            for s in socks:  # unblock the other streams at once
                shutdown(s)

    def run(index: int) -> None:
        def mark() -> None:
            marks[index] = time.monotonic()

        try:
            sock = open_stream(index)
            with lock:
                socks.append(sock)
                if cancelled.is_set():
                    shutdown(sock)
            mark()
            work(sock, mark)
        except BaseException as exc:
            stop_all(exc)

    threads = [
        threading.Thread(target=run, args=(i,), name="netloader-stream", daemon=True)
        for i in range(count)
    ]
    try:
        for t in threads:
            t.start()
        while running := [t for t in threads if t.is_alive()]:
            running[0].join(timeout=min(0.5, idle / 4))
            now = time.monotonic()
            stale = [i for i, t in enumerate(threads) if t.is_alive() and now - marks[i] > idle]
            if stale and not cancelled.is_set():
                stop_all(TimeoutError(f"no chunk completed for {idle:g} s"))
    finally:
        for s in socks:
            close(s)
    if errors:
        # Prefer the error that explains the stop over the closures it caused in other streams.
        for exc in errors:
            if isinstance(exc, PullError | TensorsChanged | ProtocolError | TimeoutError):
                raise exc
        raise errors[0]


# --- vectored I/O ----------------------------------------------------------------------


def send_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Send ``bufs`` in order, never copying: runs of small buffers go out in one vectored
    ``sendmsg`` (held back with MSG_MORE to join what follows), large ones with ``sendall``."""
    batch: list[memoryview] = []
    try:
        for buf in bufs:
            if len(buf) >= LARGE:
                if batch:
                    _sendmsg_all(sock, batch, socket.MSG_MORE)
                    batch = []
                sock.sendall(buf)
            elif len(buf):
                batch.append(buf)
        if batch:
            _sendmsg_all(sock, batch, 0)
    except BlockingIOError:
        raise TimeoutError("peer read nothing within the idle limit") from None


def recv_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Fill ``bufs`` in order straight into their memory: runs of small buffers with one
    vectored read, large ones with MSG_WAITALL (one system call for the whole buffer)."""
    batch: list[memoryview] = []
    try:
        for buf in bufs:
            if len(buf) >= LARGE:
                if batch:
                    _recvmsg_all(sock, batch)
                    batch = []
                while len(buf):
                    got = sock.recv_into(buf, len(buf), socket.MSG_WAITALL)
                    if got == 0:
                        raise ConnectionResetError("peer closed the data connection")
                    buf = buf[got:]
            elif len(buf):
                batch.append(buf)
        if batch:
            _recvmsg_all(sock, batch)
    except BlockingIOError:
        raise TimeoutError("peer sent nothing within the idle limit") from None


def _sendmsg_all(sock: socket.socket, bufs: list[memoryview], flags: int) -> None:
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + IOV_MAX], [], flags)
        i, bufs = _advance(bufs, i, sent)


def _recvmsg_all(sock: socket.socket, bufs: list[memoryview]) -> None:
    i = 0
    while i < len(bufs):
        got = sock.recvmsg_into(bufs[i : i + IOV_MAX], 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise ConnectionResetError("peer closed the data connection")
        i, bufs = _advance(bufs, i, got)


def _advance(bufs: list[memoryview], i: int, done: int) -> tuple[int, list[memoryview]]:
    """Skip ``done`` bytes of ``bufs`` starting at buffer ``i``."""
    while done:
        if done >= len(bufs[i]):
            done -= len(bufs[i])
            i += 1
        else:
            bufs[i] = bufs[i][done:]
            done = 0
    return i, bufs
