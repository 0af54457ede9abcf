"""Weights over TCP: several parallel streams, vectored sends, reads straight into tensors.

Every data stream is its own TCP connection to the server's one port; its first frame names the
session. The client decides which chunk comes next: it asks on each stream for a chunk by
index (an 8-byte request), keeping a few requests outstanding so the link never idles, and the
server answers each with an 8-byte header (the index) followed by the chunk's bytes, read
straight from the tensors. The client reads the header, then the bytes straight into the
destination tensors' own memory. Python never touches a weight byte. Chunks with pieces in
device memory go through two pinned host slices per stream, the copies overlapping the socket
(see ``staging``).

Requests: a chunk index, ``END`` (no more on this stream) or ``PING`` (still here, nothing to
ask yet: the client waits for chunks other sources have in flight). Answers: the chunk, or
``ERROR`` followed by a Refuse frame when the server stopped for a reason the client should know.
"""

from __future__ import annotations

import collections
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

import torch

from netloader.digest import XXH3, streaming
from netloader.errors import Code, ProtocolError, PullError, Refused, TensorsChanged, Withdrawn
from netloader.options import MAX_STREAMS
from netloader.protocol import Channel, Hello, Refuse, StreamAttach, encode
from netloader.sockets import close, connect, kernel_timeouts, shutdown
from netloader.transport.base import Incoming, Outgoing, Transport
from netloader.transport.staging import DeviceStaging, Staging

CHUNK_HEADER = struct.Struct("!q")
END = -1  # request: this stream asks for no more chunks
PING = -3  # request: nothing to ask yet, keep the stream open
ERROR = -2  # answer: a Refuse frame follows
WINDOW = 2  # requests a client keeps outstanding per stream
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
        return True  # device tensors are staged through pinned host slices

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
        try:
            Streams(out.streams, out.idle, out.cancelled).run(
                lambda index: self._wait_attached(out), lambda s, mark: serve_stream(s, out, mark)
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
        Streams(inc.streams, inc.idle, threading.Event()).run(
            lambda index: open_stream(inc, index), lambda s, mark: fetch_stream(s, inc, mark)
        )


# --- one stream ---------------------------------------------------------------------------


def serve_stream(
    sock: socket.socket, out: Outgoing, mark: Callable[[], None], payload: bool = True
) -> None:
    """Answer this stream's requests until the client says END: each with the chunk's bytes,
    or (``payload=False``, for CUDA IPC) with its index alone, once the client may copy it."""
    staging = Staging(out.snapshot.plan, out.snapshot.buffers)
    kernel_timeouts(sock, out.idle)
    request = bytearray(CHUNK_HEADER.size)
    while not out.cancelled.is_set():
        recv_buffers(sock, [memoryview(request)])
        mark()
        (index,) = CHUNK_HEADER.unpack(request)
        if index == END:
            return
        if index == PING:
            continue
        if not 0 <= index < out.snapshot.plan.num_chunks:
            raise ProtocolError(f"client asked for chunk {index} of {out.snapshot.plan.num_chunks}")
        views = _ready(sock, out, staging, index, payload)
        header = memoryview(CHUNK_HEADER.pack(index))
        if not payload:
            sock.sendall(header)
        elif views is None:
            out.pace(index)
            _sendmsg_all(sock, [header], socket.MSG_MORE)
            staging.device.send(index, lambda view: send_buffers(sock, [view]))
        else:
            out.pace(index)
            send_buffers(sock, [header, *views])
        out.count(index)
        mark()


def _ready(
    sock: socket.socket, out: Outgoing, staging: Staging, index: int, payload: bool
) -> list[memoryview] | None:
    """Wait until chunk ``index`` may go out and check it (``out.verify``): its host views, or
    None when it goes through device staging or carries no payload. A refusal is told to the
    client on this stream before it is raised."""
    try:
        out.snapshot.wait_ready(index, out.idle)  # a relay may still be receiving it
        views = staging.views(index) if payload and not staging.on_device(index) else None
        out.check(index, views)
        return views
    except (TensorsChanged, Withdrawn) as exc:
        code = Code.CHANGED if isinstance(exc, TensorsChanged) else Code.UNAVAILABLE
        sock.sendall(CHUNK_HEADER.pack(ERROR) + encode(Refuse(code, str(exc))))
        raise


def fetch_stream(sock: socket.socket, inc: Incoming, mark: Callable[[], None]) -> None:
    """Ask for chunks from the board, up to WINDOW at a time, until it has none left; each
    lands straight in its tensors (device pieces through pinned slices) and is verified."""
    staging = Staging(inc.plan, inc.buffers)
    kernel_timeouts(sock, inc.idle)

    def land(asked: collections.deque[int]) -> list[int]:
        header = bytearray(CHUNK_HEADER.size)
        recv_buffers(sock, [memoryview(header)])
        index = take_answer(sock, inc, asked, CHUNK_HEADER.unpack(header)[0])
        inc.wrote = True
        if staging.on_device(index):
            _receive_staged(sock, inc, staging.device, index)
        else:
            views = staging.views(index)
            recv_buffers(sock, views)
            inc.verify(index, views)
        return [index]

    request_chunks(sock, inc, mark, WINDOW, land)
    sock.sendall(CHUNK_HEADER.pack(END))


def _receive_staged(sock: socket.socket, inc: Incoming, device: DeviceStaging, index: int) -> None:
    """Chunk ``index`` through pinned slices. XXH3 digests are taken from the slices as they
    pass; ``wsum64`` ones on the device, once the chunk is there."""
    hasher = streaming() if inc.digests is not None and inc.digest_kind == XXH3 else None

    def take(view: memoryview) -> None:
        recv_buffers(sock, [view])
        if hasher is not None:
            hasher.update(view)

    device.receive(index, take)
    if hasher is not None:
        inc.expect(index, hasher.intdigest())
    else:
        inc.verify(index)


def request_chunks(
    sock: socket.socket,
    inc: Incoming,
    mark: Callable[[], None],
    window: int,
    land: Callable[[collections.deque[int]], list[int]],
) -> None:
    """Keep up to ``window`` chunk requests outstanding on ``sock`` until the board has no
    chunk left for this source. ``land(asked)`` takes the next answers (popping them from
    ``asked``) and returns the chunks now in place and verified. The caller ends the stream."""
    asked: collections.deque[int] = collections.deque()
    while True:
        fresh: list[int] = []
        while (
            len(asked) + len(fresh) < window and (index := inc.board.take(inc.source)) is not None
        ):
            fresh.append(index)
        if fresh:
            sock.sendall(b"".join(CHUNK_HEADER.pack(i) for i in fresh))
            asked.extend(fresh)
        if not asked:
            if inc.board.finished:
                return
            inc.board.wait_for_work(inc.idle / 3)  # chunks in flight elsewhere may come back
            sock.sendall(CHUNK_HEADER.pack(PING))
            mark()  # waiting for work is not a stall
            continue
        for index in land(asked):
            inc.board.done(index)
        mark()


def take_answer(sock: socket.socket, inc: Incoming, asked: collections.deque[int], got: int) -> int:
    """The server answered ``got``: the first chunk asked, popped; a refusal (the Refuse frame
    that follows ERROR) or another chunk is raised."""
    if got == ERROR:
        refusal = Channel(sock, inc.idle).recv(Refuse)
        raise Refused(refusal.reason, code=refusal.code, partial=inc.wrote)
    if got != asked[0]:
        raise ProtocolError(f"server sent chunk {got}, not the requested {asked[0]}")
    return asked.popleft()


def open_stream(inc: Incoming, index: int) -> socket.socket:
    """Data connection ``index`` of ``inc``'s session, attached."""
    sock = connect(inc.host, inc.port, inc.idle)
    try:
        channel = Channel(sock, inc.idle)
        channel.recv(Hello)
        channel.send(StreamAttach(inc.session, index))
        return sock
    except BaseException:
        sock.close()
        raise


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

    def run(
        self,
        open_stream: Callable[[int], socket.socket],
        work: Callable[[socket.socket, Callable[[], None]], None],
    ) -> None:
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

    def _one(
        self,
        index: int,
        open_stream: Callable[[int], socket.socket],
        work: Callable[[socket.socket, Callable[[], None]], None],
    ) -> None:
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
