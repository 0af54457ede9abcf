"""Weights over TCP: several parallel streams, vectored sends, reads straight into tensors.

Every data stream is its own TCP connection to the server's one port; its first frame names the
session. On each, the client asks for chunks by index (an 8-byte request, see ``chunks``) and
the server answers each with an 8-byte header (the index) followed by the chunk's bytes, read
straight from the tensors; the client reads the header, then the bytes straight into the
destination tensors' own memory (``vectored``). Python never touches a weight byte. Chunks
with pieces in device memory go through two pinned host slices per stream, the copies
overlapping the socket (see ``staging``).
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable

import torch

from netloader.digest import XXH3, streaming
from netloader.errors import (
    Code,
    PeerClosed,
    ProtocolError,
    Refused,
    TensorsChanged,
    Withdrawn,
)
from netloader.protocol import (
    MAX_STREAMS,
    Attached,
    Channel,
    Hello,
    Refuse,
    StreamAttach,
    encode,
)
from netloader.sockets import connect, kernel_timeouts, shutdown
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.chunks import (
    CHUNK_HEADER,
    END,
    ERROR,
    PING,
    WINDOW,
    Mark,
    answer_requests,
    request_chunks,
)
from netloader.transport.staging import DeviceStaging, Staging
from netloader.transport.streams import AttachedSending, Streams
from netloader.transport.vectored import recv_buffers, send_buffers, sendmsg_all


class TcpEngine(Engine):
    name = "tcp"
    max_streams = MAX_STREAMS

    def supports(self, device: torch.device) -> bool:
        return True  # device tensors are staged through pinned host slices

    def proposes(self, device: torch.device, source_host: str | None) -> bool:
        return True  # any server can use it: the last resort of every proposal

    def sending(self, out: Outgoing) -> Sending:
        return TcpSending(out)

    def receive(self, inc: Incoming) -> None:
        Streams(inc.streams, inc.idle, threading.Event()).run(
            lambda index: open_stream(inc, index), lambda s, mark: fetch_stream(s, inc, mark)
        )


class TcpSending(AttachedSending):
    """One transfer's streams, each answered in its own thread."""

    def send(self) -> None:
        self.run_streams(lambda sock, mark: serve_stream(sock, self.out, mark))


# --- the server's side of one stream ------------------------------------------------------


def serve_stream(
    sock: socket.socket, out: Outgoing, mark: Mark, payload: bool = True, paced: bool = False
) -> None:
    """Answer this stream's requests until the client says END: each with the chunk's bytes,
    or (``payload=False``, for CUDA IPC and mooncake) with its index alone, once the client may
    copy or read it; ``paced``: such answers wait for the upload cap too (mooncake: the client
    reads what it is told it may)."""
    staging = Staging(out.snapshot.plan, out.snapshot.buffers)
    kernel_timeouts(sock, out.idle)
    request = bytearray(CHUNK_HEADER.size)

    def next_request() -> int:
        recv_buffers(sock, [memoryview(request)])
        return CHUNK_HEADER.unpack(request)[0]

    def answer(index: int) -> None:
        views = _ready(sock, out, staging, index, payload)
        header = memoryview(CHUNK_HEADER.pack(index))
        if not payload:
            if paced:
                out.pace(index)
            sock.sendall(header)
        elif views is None:
            out.pace(index)
            sendmsg_all(sock, [header], socket.MSG_MORE)
            staging.device.send(index, lambda view: send_buffers(sock, [view]))
        else:
            out.pace(index)
            send_buffers(sock, [header, *views])

    answer_requests(next_request, out, mark, answer)


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


# --- the client's side of one stream ------------------------------------------------------


class SocketAsking:
    """Requests as 8-byte headers on ``sock``; ``land`` takes the answers (``chunks.Asking``).
    Its answers land through the board's claims, so it may carry endgame copies."""

    copies = True

    def __init__(self, sock: socket.socket, land: Callable[[collections.deque[int]], list[int]]):
        self.sock = sock
        self.land = land

    def ask(self, indices: list[int]) -> None:
        self.sock.sendall(b"".join(CHUNK_HEADER.pack(i) for i in indices))

    def ping(self) -> None:
        self.sock.sendall(CHUNK_HEADER.pack(PING))

    def end(self) -> None:
        self.sock.sendall(CHUNK_HEADER.pack(END))


def fetch_stream(sock: socket.socket, inc: Incoming, mark: Mark) -> None:
    """Ask for chunks from the board, up to WINDOW at a time, until it has none left; each
    lands straight in its tensors (device pieces through pinned slices) and is verified. Once
    the board is complete, a stream still waiting for an answer (a chunk another source
    delivered first) is cut: nobody needs it; so is every stream of a source retired (found
    slow), whose chunks in flight then go to the others."""
    staging = Staging(inc.plan, inc.buffers)
    kernel_timeouts(sock, inc.idle)
    waiting = threading.Event()  # set while waiting for the next answer
    cut = threading.Event()

    def on_complete() -> None:
        if waiting.is_set():
            cut.set()
            shutdown(sock)

    def on_retired() -> None:
        cut.set()
        shutdown(sock)

    def land(asked: collections.deque[int]) -> list[int]:
        header = bytearray(CHUNK_HEADER.size)
        waiting.set()
        try:
            recv_buffers(sock, [memoryview(header)])
        finally:
            waiting.clear()
        index = take_answer(sock, inc, asked, CHUNK_HEADER.unpack(header)[0])
        inc.wrote = True
        if not inc.board.claim(index, inc.source):
            return _land_aside(sock, inc, staging, index)
        if staging.on_device(index):
            _receive_staged(sock, inc, staging.device, index)
        else:
            views = staging.views(index)
            recv_buffers(sock, views)
            inc.verify(index, views)
        return [index]

    inc.board.when_complete(on_complete)
    inc.board.when_retired(inc.source, on_retired)
    stream = SocketAsking(sock, land)
    try:
        request_chunks(stream, inc, mark, WINDOW)
        stream.end()
    except OSError:
        if cut.is_set():
            return
        raise


def _land_aside(sock: socket.socket, inc: Incoming, staging: Staging, index: int) -> list[int]:
    """A chunk another source was asked for too: into a buffer of its own, checked there, and
    put in place only if no other copy won (the board says which). Nothing left to mark."""
    aside = memoryview(bytearray(inc.plan.chunk_bytes(index)))
    recv_buffers(sock, [aside])
    inc.verify(index, [aside])

    offset = 0

    def fill(view: memoryview) -> None:  # the next ``len(view)`` bytes of the copy
        nonlocal offset
        view[:] = aside[offset : offset + len(view)]
        offset += len(view)

    def put() -> None:
        if staging.on_device(index):
            staging.device.receive(index, fill)
        else:
            for view in staging.views(index):
                fill(view)

    inc.board.commit(index, inc.source, put)
    return []


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
    """Data connection ``index`` of ``inc``'s session, attached: at the address dialled, or,
    if that reached another server than the one that accepted, at the server's own address."""
    confirm = inc.data is not None
    for host, port in [(inc.host, inc.port), *([inc.data] if inc.data else [])]:
        sock = connect(host, port, inc.idle)
        try:
            channel = Channel(sock, inc.idle)
            channel.recv(Hello)
            channel.send(StreamAttach(inc.session, index, confirm))
            if not confirm or isinstance(channel.recv_any(Attached, Refuse), Attached):
                return sock
        except BaseException:
            sock.close()
            raise
        sock.close()
    raise PeerClosed(f"the server that accepted refused data connection {index} at {host}:{port}")
