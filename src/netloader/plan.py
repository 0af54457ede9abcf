"""How the bytes of a transfer are cut into chunks.

The tensors that travel are laid end to end in one virtual byte stream, which is cut into chunks
of ``chunk_size`` bytes. A chunk is the unit of scheduling (any stream may carry any chunk), of
integrity checking (one digest per chunk) and of progress. Many small tensors share one chunk, so
they go out in one vectored send; a large tensor spans several chunks, so it is spread over all
streams. Server and client compute the same plan from the same sizes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

MIN_CHUNK = 64 << 10
MAX_CHUNK = 256 << 20


class Piece(NamedTuple):
    """Bytes ``start:stop`` of tensor ``slot``."""

    slot: int
    start: int
    stop: int


class Plan:
    def __init__(self, sizes: Sequence[int], chunk_size: int):
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size {chunk_size} is outside {MIN_CHUNK}..{MAX_CHUNK}")
        self.sizes = list(sizes)
        self.chunk_size = chunk_size
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.total_bytes = self.offsets[-1]
        self.num_chunks = -(-self.total_bytes // chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.total_bytes)

    def chunk_bytes(self, index: int) -> int:
        start, stop = self.chunk_range(index)
        return stop - start

    def pieces(self, index: int) -> list[Piece]:
        """The tensor byte ranges that make up chunk ``index``, in stream order."""
        start, stop = self.chunk_range(index)
        # The last slot whose offset is <= start; empty tensors occupy no bytes and are skipped.
        slot = bisect.bisect_right(self.offsets, start) - 1
        out = []
        pos = start
        while pos < stop:
            slot_end = self.offsets[slot + 1]
            if slot_end > pos:
                end = min(slot_end, stop)
                base = self.offsets[slot]
                out.append(Piece(slot, pos - base, end - base))
                pos = end
            slot += 1
        return out

    def joined(self, indices: Sequence[int]) -> list[Piece]:
        """The pieces of chunks ``indices``, in order, adjacent ones of a tensor joined into one
        (consecutive chunks of a large tensor become one range)."""
        out: list[Piece] = []
        for index in indices:
            for piece in self.pieces(index):
                last = out[-1] if out else None
                if last is not None and last.slot == piece.slot and last.stop == piece.start:
                    out[-1] = Piece(piece.slot, last.start, piece.stop)
                else:
                    out.append(piece)
        return out
