"""Vectored socket I/O straight from and into tensor memory, never copying the payload:
runs of small buffers in one ``sendmsg``/``recvmsg_into``, large ones in one call each."""

from __future__ import annotations

import socket

IOV_MAX = 512  # below the kernel's 1024 iovec limit
LARGE = 256 << 10  # buffers at least this big get a system call of their own


def send_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Send ``bufs`` in order, never copying: runs of small buffers go out in one vectored
    ``sendmsg`` (held back with MSG_MORE to join what follows), large ones with ``sendall``."""
    batch: list[memoryview] = []
    try:
        for buf in bufs:
            if len(buf) >= LARGE:
                if batch:
                    sendmsg_all(sock, batch, socket.MSG_MORE)
                    batch = []
                sock.sendall(buf)
            elif len(buf):
                batch.append(buf)
        if batch:
            sendmsg_all(sock, batch, 0)
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


def sendmsg_all(sock: socket.socket, bufs: list[memoryview], flags: int) -> None:
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
