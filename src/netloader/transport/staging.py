"""Where a chunk's bytes meet a socket: host tensors in place, device tensors through pinned
host slices.

``Staging`` gives host views of a chunk whose pieces are all in host memory: the socket reads
and writes the tensors themselves (a memoryview per tensor is made once, pieces are slices of
it). ``DeviceStaging`` moves a chunk with pieces in device memory through two pinned host
slices per stream (1 MiB each), never a full host copy: on the sending side the device-to-host
copy of slice k+1 runs on a copy stream while slice k is on the wire, on the receiving side the
host-to-device copy of slice k runs while slice k+1 arrives. Either way a chunk's copies are
complete when ``send`` or ``receive`` returns, so a chunk is only marked done (and relayed)
once its bytes are in place. What is not overlapped: the first slice's copy of each chunk on
the sending side, and the last slice's copy on the receiving side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from netloader.plan import Plan
from netloader.tensors import host_view

SLICE = 1 << 20

#: Per slice: (the part of a tensor's flat bytes, its offset in the slice).
Parts = list[tuple[torch.Tensor, int]]


class Staging:
    """Host views of chunks; ``on_device(i)`` says when chunk ``i`` needs ``device`` instead."""

    def __init__(self, plan: Plan, buffers: list[torch.Tensor]):
        self.plan = plan
        self.buffers = buffers
        self.host = [host_view(b) if b.device.type == "cpu" else None for b in buffers]
        self.any_device = any(h is None for h in self.host)
        self._device: DeviceStaging | None = None

    def on_device(self, index: int) -> bool:
        """Whether chunk ``index`` has bytes outside host memory (never, for host tensors)."""
        return self.any_device and any(self.host[p.slot] is None for p in self.plan.pieces(index))

    def views(self, index: int) -> list[memoryview]:
        """Views of chunk ``index``'s pieces, all in host memory, in stream order."""
        return [self.host[slot][start:stop] for slot, start, stop in self.plan.pieces(index)]  # type: ignore[index]

    @property
    def device(self) -> DeviceStaging:
        """The pinned slices for chunks with device pieces, made on first use."""
        if self._device is None:
            self._device = DeviceStaging(self.plan, self.buffers)
        return self._device


class DeviceStaging:
    """Chunks with device pieces, through two pinned host slices and one copy stream.

    Host pieces of such a chunk go through the slices too (a plain copy). All device pieces
    must be on one device. Without CUDA (another accelerator, or host tensors in the tests)
    the copies are synchronous and nothing overlaps.
    """

    def __init__(self, plan: Plan, buffers: list[torch.Tensor], slice_bytes: int = SLICE):
        self.plan = plan
        self.buffers = buffers
        devices = {b.device for b in buffers if b.device.type != "cpu"}
        if len(devices) > 1:
            raise ValueError(f"tensors on several devices: {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        cuda = self.device.type == "cuda"
        size = min(plan.chunk_size, slice_bytes)
        self.slices = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.views = [host_view(s) for s in self.slices]
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.events: list[torch.cuda.Event | None] = [None, None]

    def send(self, index: int, put: Callable[[memoryview], None]) -> None:
        """Hand chunk ``index`` to ``put`` slice by slice; the next slice is copied to the host
        while ``put`` sends this one.

        The copy stream does not wait for the caller's stream: served tensors are fixed once
        captured (the capture synchronised; a relay's chunk is served once it has landed, its
        copies complete), and inside a vLLM worker the caller's stream is the legacy default
        stream, where every chunk would queue behind the engine's forward passes."""
        parts = self._parts(index)
        self._load(0, parts[0])
        for k, part in enumerate(parts):
            if k + 1 < len(parts):
                self._load((k + 1) % 2, parts[k + 1])  # its slice was sent by the last put
            self._wait(k % 2)
            put(self.views[k % 2][: _length(part)])

    def receive(self, index: int, take: Callable[[memoryview], None]) -> None:
        """Fill chunk ``index`` from ``take`` (which fills each slice it is given); each slice
        is copied to the device while ``take`` fills the next. Returns with every byte in
        place."""
        self._follow_callers()
        for k, part in enumerate(self._parts(index)):
            self._wait(k % 2)  # the copy that last read this slice is done
            take(self.views[k % 2][: _length(part)])
            self._store(k % 2, part)
        self._wait(0)
        self._wait(1)

    def _parts(self, index: int) -> list[Parts]:
        """Chunk ``index``'s pieces cut at slice boundaries."""
        size = self.slices[0].numel()
        out: list[Parts] = [[]]
        used = 0
        for slot, start, stop in self.plan.pieces(index):
            while start < stop:
                if used == size:
                    out.append([])
                    used = 0
                n = min(stop - start, size - used)
                out[-1].append((self.buffers[slot][start : start + n], used))
                used += n
                start += n
        return out

    def _load(self, which: int, part: Parts) -> None:
        with on_stream(self.stream):
            for piece, offset in part:
                self.slices[which][offset : offset + piece.numel()].copy_(piece, non_blocking=True)
            self._record(which)

    def _store(self, which: int, part: Parts) -> None:
        with on_stream(self.stream):
            for piece, offset in part:
                piece.copy_(self.slices[which][offset : offset + piece.numel()], non_blocking=True)
            self._record(which)

    def _follow_callers(self) -> None:
        """Order the copy stream after work the caller queued on the destination tensors
        (receiving only)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _record(self, which: int) -> None:
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[which] = event

    def _wait(self, which: int) -> None:
        event, self.events[which] = self.events[which], None
        if event is not None:
            event.synchronize()


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Queue the device work of the block on ``stream`` (None: as usual)."""
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def _length(part: Parts) -> int:
    piece, offset = part[-1]
    return offset + piece.numel()
