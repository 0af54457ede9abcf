"""The client's copies on the ``cuda_ipc`` transport: the server's answers (chunk indices) as
they arrive, and the copies out of the mapped storages, verified on the destination device."""

from __future__ import annotations

import socket
from collections import deque

import torch

from netloader.digest import WSUM, fingerprints
from netloader.transport.base import Incoming
from netloader.transport.chunks import CHUNK_HEADER, ERROR
from netloader.transport.staging import on_stream
from netloader.transport.tcp import take_answer
from netloader.transport.vectored import recv_buffers


def answers(sock: socket.socket, inc: Incoming, asked: deque[int]) -> list[int]:
    """The chunks the server has said are ready: one (waiting for it), then every further
    whole answer already here, up to a refusal (left for the next call to raise)."""
    header = bytearray(CHUNK_HEADER.size)
    recv_buffers(sock, [memoryview(header)])
    ready = [take_answer(sock, inc, asked, CHUNK_HEADER.unpack(header)[0])]
    try:
        peeked = sock.recv(len(asked) * CHUNK_HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        peeked = b""
    size = CHUNK_HEADER.size
    got = [CHUNK_HEADER.unpack_from(peeked, at)[0] for at in range(0, len(peeked) - size + 1, size)]
    count = next((k for k, index in enumerate(got) if index == ERROR), len(got))
    if count:
        recv_buffers(sock, [memoryview(bytearray(count * size))])  # already here: consume them
        ready += [take_answer(sock, inc, asked, index) for index in got[:count]]
    return ready


class Copier:
    """Copies answered chunks out of the mapped storages into the destination on one stream,
    and checks them on the destination device."""

    def __init__(self, inc: Incoming, sources: list[torch.Tensor | None]):
        self.inc = inc
        self.sources = sources
        device = destination_device(inc)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.stream is not None:  # after the caller's work and the producer's event
            for other in {device} | {s.device for s in sources if s is not None}:
                self.stream.wait_stream(torch.cuda.current_stream(other))

    def copy(self, indices: list[int]) -> list[int]:
        """Copy chunks ``indices`` and verify them; returns them, in place."""
        inc = self.inc
        wsum = inc.digests is not None and inc.digest_kind == WSUM
        with on_stream(self.stream):
            for slot, start, stop in inc.plan.joined(indices):
                source = self.sources[slot]
                assert source is not None
                inc.buffers[slot][start:stop].copy_(source[start:stop], non_blocking=True)
            got = fingerprints(inc.plan, inc.buffers, indices) if wsum else None
        self._synchronize()
        for k, index in enumerate(indices):
            if got is not None:
                inc.expect(index, got[k])
            else:
                inc.verify(index)
        return indices

    def release(self) -> None:
        """Wait for the copies, then drop the mappings (torch closes the handles)."""
        self._synchronize()
        self.sources = []

    def _synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def destination_device(inc: Incoming) -> torch.device:
    """The device of ``inc``'s destination tensors (the first with bytes)."""
    return next((b.device for b in inc.buffers if b.numel()), torch.device("cpu"))
