"""Raw byte views of tensors, and the snapshot of tensors that a server serves.

Weight bytes never pass through Python objects: sockets read and write straight into the
tensors' memory through the memoryviews made here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from netloader.digest import digest
from netloader.manifest import Manifest
from netloader.plan import Plan

# 4 MiB: a chunk is still in the CPU cache when it is hashed right after landing. XXH3 measured
# on the development machine: 47 GB/s on a cache-resident 4 MiB buffer, 14 GB/s on 16 MiB.
DEFAULT_CHUNK = 4 << 20


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of the bytes of contiguous tensor ``t`` (no copy)."""
    if not t.is_contiguous():
        raise ValueError("flat_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.detach().reshape(-1).view(torch.uint8)


def host_view(flat: torch.Tensor) -> memoryview:
    """A writable memoryview of a 1-D uint8 CPU tensor; the tensor must outlive the view."""
    if flat.device.type != "cpu" or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("host_view needs a 1-D uint8 CPU tensor")
    n = flat.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(flat.data_ptr())).cast("B")


def find_aliases(tensors: list[torch.Tensor]) -> dict[int, int]:
    """Map index -> earlier index for tensors that are the very same view of the same memory."""
    first: dict[tuple, int] = {}
    aliases = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in first:
            aliases[i] = first[key]
        else:
            first[key] = i
    return aliases


class Snapshot:
    """The tensors of one rank as a server captured them: byte views, plan and digests.

    Non-contiguous tensors are copied once into contiguous memory; everything else is served from
    the caller's memory, so the caller must not change those tensors while they are served
    (``changed()`` detects it when digests are on). Tied tensors travel once.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        chunk_size: int = DEFAULT_CHUNK,
        with_digests: bool = True,
    ):
        self.manifest = Manifest.of(tensors)
        views = [t.detach() for t in tensors.values()]
        self.aliases = find_aliases(views)
        self.buffers = [
            flat_bytes(t.contiguous()) if i not in self.aliases else flat_bytes(t[:0].reshape(0))
            for i, t in enumerate(views)
        ]
        self.plan = Plan([b.numel() for b in self.buffers], chunk_size)
        self.digests: list[int] | None = self.compute_digests() if with_digests else None

    @property
    def device(self) -> torch.device:
        devices = {b.device for b in self.buffers if b.numel()}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def chunk_digest(self, index: int) -> int:
        return digest(self._host_pieces(index))

    def _host_pieces(self, index: int) -> list[memoryview]:
        out = []
        for slot, start, stop in self.plan.pieces(index):
            piece = self.buffers[slot][start:stop]
            out.append(host_view(piece if piece.device.type == "cpu" else piece.cpu()))
        return out

    def compute_digests(self) -> list[int]:
        with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
            return list(pool.map(self.chunk_digest, range(self.plan.num_chunks)))

    def changed(self) -> list[str]:
        """Names of the tensors in chunks whose bytes differ from capture (empty without
        digests). Digests are per chunk, so a tensor that shares a chunk with a changed one is
        listed too."""
        if self.digests is None:
            return []
        fresh = self.compute_digests()
        names = [s.name for s in self.manifest.specs]
        bad: dict[str, None] = {}
        for index, (old, new) in enumerate(zip(self.digests, fresh, strict=True)):
            if old != new:
                for piece in self.plan.pieces(index):
                    bad[names[piece.slot]] = None
        return list(bad)


def describe_changed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"data changed since capture in chunks holding {len(names)} tensor(s): {shown}{more}"


def _hash_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))
