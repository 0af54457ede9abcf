"""The tensors a server serves: byte views, chunk plan, digests, and which chunks are there yet.

A server usually serves tensors it captured whole. A relay serves the tensors it is still
receiving: a chunk becomes available once it landed and was verified against the digests its
own source sent, and a peer asking for a chunk that has not arrived waits for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from netloader.digest import WSUM, XXH3, chunk_digest, fingerprints
from netloader.errors import Withdrawn, shorten
from netloader.manifest import Manifest
from netloader.options import DEFAULT_CHUNK
from netloader.plan import Plan
from netloader.tensors import find_aliases, flat_bytes


class Snapshot:
    """The tensors of one rank as a server captured them: byte views, plan and digests.

    Non-contiguous tensors are copied once into contiguous memory; everything else is served from
    the caller's memory, so the caller must not change those tensors while they are served
    (``changed()`` detects it when digests are on). Tied tensors travel once.

    Digests are XXH3 for tensors in host memory; if any tensor is on a device they are the
    ``wsum64`` fingerprint, computed on the device (see ``digest``). ``digest_kind`` says which.
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
        on_device = any(b.device.type != "cpu" for b in self.buffers)
        self.digest_kind = WSUM if on_device else XXH3
        self.digests: list[int] | None = self.compute_digests() if with_digests else None
        #: Which chunks may be sent; None when all of them may.
        self.ready: Availability | None = None

    @classmethod
    def receiving(
        cls,
        manifest: Manifest,
        aliases: dict[int, int],
        buffers: list[torch.Tensor],
        plan: Plan,
        digests: list[int],
        digest_kind: str = XXH3,
    ) -> Snapshot:
        """A relay's snapshot: ``buffers`` are being filled; ``ready.mark(i)`` once chunk ``i``
        landed and matched ``digests[i]`` (of ``digest_kind``, as its own source sent them)."""
        snapshot = cls.__new__(cls)
        snapshot.manifest, snapshot.aliases = manifest, aliases
        snapshot.buffers, snapshot.plan, snapshot.digests = buffers, plan, digests
        snapshot.digest_kind = digest_kind
        snapshot.ready = Availability(plan.num_chunks)
        return snapshot

    def use(self, name: str, tensor: torch.Tensor) -> None:
        """Serve ``tensor`` (same bytes, e.g. a pristine copy) for ``name`` from now on."""
        slot = next(i for i, s in enumerate(self.manifest.specs) if s.name == name)
        if slot not in self.aliases:
            self.buffers[slot] = flat_bytes(tensor.contiguous())

    def wait_ready(self, index: int, timeout: float) -> None:
        """Return once chunk ``index`` may be sent; TimeoutError after ``timeout`` seconds,
        Withdrawn if the relay stopped."""
        if self.ready is not None:
            self.ready.wait(index, timeout)

    @property
    def device(self) -> torch.device:
        devices = {b.device for b in self.buffers if b.numel()}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def chunk_digest(self, index: int, views: list[memoryview] | None = None) -> int:
        """Chunk ``index``'s digest of this snapshot's kind (``views``: its bytes in host
        memory, when the caller has them at hand)."""
        return chunk_digest(self.digest_kind, self.plan, self.buffers, index, views)

    def compute_digests(self) -> list[int]:
        if self.digest_kind == WSUM:
            return fingerprints(self.plan, self.buffers, range(self.plan.num_chunks))
        with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
            return list(pool.map(self.chunk_digest, range(self.plan.num_chunks)))

    def names_in(self, index: int) -> list[str]:
        """Names of the tensors with bytes in chunk ``index``."""
        specs = self.manifest.specs
        return [specs[piece.slot].name for piece in self.plan.pieces(index)]

    def changed(self) -> list[str]:
        """Names of the tensors in chunks whose bytes differ from capture (empty without
        digests). Digests are per chunk, so a tensor that shares a chunk with a changed one is
        listed too."""
        if self.digests is None:
            return []
        fresh = self.compute_digests()
        bad: dict[str, None] = {}
        for index, (old, new) in enumerate(zip(self.digests, fresh, strict=True)):
            if old != new:
                bad.update(dict.fromkeys(self.names_in(index)))
        return list(bad)


def describe_changed(names: list[str]) -> str:
    shown = shorten([repr(n) for n in names], limit=5)
    return f"data changed since capture in chunks holding {len(names)} tensor(s): {shown}"


def _hash_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


class Availability:
    """The chunks of a relay's snapshot that have landed and were verified."""

    def __init__(self, num_chunks: int):
        self._have = bytearray(num_chunks)
        self._left = num_chunks
        self._withdrawn: str | None = None
        self._cond = threading.Condition()

    @property
    def complete(self) -> bool:
        return self._left == 0

    def mark(self, index: int) -> None:
        with self._cond:
            if not self._have[index]:
                self._have[index] = 1
                self._left -= 1
                self._cond.notify_all()

    def withdraw(self, reason: str) -> None:
        """No chunk that is missing now will come: wake every waiting peer with ``reason``."""
        with self._cond:
            self._withdrawn = reason
            self._cond.notify_all()

    def wait(self, index: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._have[index] or self._withdrawn, timeout)
            if self._withdrawn:
                raise Withdrawn(self._withdrawn)
            if not self._have[index]:
                raise TimeoutError(f"chunk {index} did not reach this relay within {timeout:g} s")
