"""Content digests that let a client prove every received byte equals what the server captured.

There are two kinds, and every Accept names the one its digest list holds (``Accept.digest``):

- ``xxh3-64`` for tensors in host memory: XXH3-64 (via the `xxhash` package), about 15 GB/s on
  one core of the development machine; it releases the GIL, so each stream thread hashes its
  own chunks in parallel.
- ``wsum64`` for tensors in device memory, computed where the bytes are, with torch ops (no
  host copy): the chunk's bytes, zero-padded to whole 8-byte little-endian words ``w_i``, give
  ``(sum_i w_i * (2i + 1) * M + n * L) mod 2**64`` for a chunk of ``n`` bytes (``M`` and ``L``
  odd constants). Every weight is odd, so changing any one byte (indeed any bits within one
  word) changes the sum: a difference ``d * 256**k`` (``0 < |d| < 256``, ``k < 8``) times an
  odd number is never a multiple of ``2**64``. Integer addition modulo ``2**64`` does not depend
  on the order of the reduction, so the CPU and every GPU give the same value for the same
  bytes: a host client can check a device server's digests, and the reverse.

Neither is cryptographic: they detect corruption and tensors that changed since capture, not a
forger (the optional shared-secret authentication is what keeps impostors out).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch
import xxhash

from netloader.plan import Plan
from netloader.tensors import host_view

XXH3 = "xxh3-64"
WSUM = "wsum64"
DIGEST_KINDS = (XXH3, WSUM)

MASK = (1 << 64) - 1
_M = 0x9E3779B97F4A7C15  # odd: the word weights are (2i + 1) * _M
_L = 0xC2B2AE3D27D4EB4F  # odd: mixes the chunk's length in
#: Bytes multiplied in one go when consecutive chunks lie in one tensor (bounds the temporary).
RUN_BYTES = 64 << 20


def digest(buffers: Iterable[memoryview]) -> int:
    """XXH3-64 of the concatenation of ``buffers``."""
    h = xxhash.xxh3_64()
    for buf in buffers:
        h.update(buf)
    return h.intdigest()


def streaming() -> xxhash.xxh3_64:
    """An XXH3-64 hasher to feed a chunk piece by piece (``update``, then ``intdigest``)."""
    return xxhash.xxh3_64()


def chunk_digest(
    kind: str, plan: Plan, buffers: Sequence[torch.Tensor], index: int, views: list | None = None
) -> int:
    """The ``kind`` digest of chunk ``index`` of ``buffers``; ``views``, if given, are host views
    of its bytes (XXH3 then reads them instead of making its own)."""
    if kind == WSUM:
        return fingerprints(plan, buffers, [index])[0]
    if views is not None:
        return digest(views)
    pieces = [buffers[slot][start:stop] for slot, start, stop in plan.pieces(index)]
    host = [p if p.device.type == "cpu" else p.cpu() for p in pieces]  # alive while hashed
    return digest([host_view(p) for p in host])


def fingerprints(plan: Plan, buffers: Sequence[torch.Tensor], indices: Iterable[int]) -> list[int]:
    """The ``wsum64`` digest of each chunk in ``indices``, computed on the device that holds it.

    Consecutive chunks that lie in one tensor, at whole words, are reduced together (one
    multiply and one sum for up to ``RUN_BYTES``); any other chunk is first gathered into one
    zero-padded buffer. The values come back with one synchronisation for the whole list.
    """
    indices = list(indices)
    if not indices:
        return []
    sums = [_run_sums(plan, buffers, run) for run in _runs(plan, buffers, indices)]
    device = sums[0].device
    words = torch.cat([s.to(device) for s in sums]).tolist()
    return [(w + plan.chunk_bytes(i) * _L) & MASK for w, i in zip(words, indices, strict=True)]


def _runs(plan: Plan, buffers: Sequence[torch.Tensor], indices: list[int]) -> list[list[int]]:
    """``indices`` cut into runs: consecutive whole, word-aligned chunks of one tensor, or a
    single chunk of any shape."""
    limit = max(1, RUN_BYTES // plan.chunk_size)
    runs: list[list[int]] = []
    for index in indices:
        last = runs[-1] if runs else None
        if (
            last is not None
            and len(last) < limit
            and last[-1] + 1 == index
            and _aligned(plan, buffers, last[0])
            and _aligned(plan, buffers, index)
            and plan.pieces(index)[0].slot == plan.pieces(last[0])[0].slot
        ):
            last.append(index)
        else:
            runs.append([index])
    return runs


def _aligned(plan: Plan, buffers: Sequence[torch.Tensor], index: int) -> bool:
    """Whether chunk ``index`` is one whole chunk of one tensor, starting on a word boundary."""
    pieces = plan.pieces(index)
    if len(pieces) != 1 or plan.chunk_size % 8:
        return False
    slot, start, stop = pieces[0]
    buf = buffers[slot]
    return (
        stop - start == plan.chunk_size
        and (buf.storage_offset() + start) % 8 == 0
        and (buf.data_ptr() + start) % 8 == 0
    )


def _run_sums(plan: Plan, buffers: Sequence[torch.Tensor], run: list[int]) -> torch.Tensor:
    """The weighted word sums (without the length term) of the chunks in ``run``."""
    if len(run) > 1 or _aligned(plan, buffers, run[0]):
        slot, start, _ = plan.pieces(run[0])[0]
        size = plan.chunk_size
        data = buffers[slot][start : start + len(run) * size]
        words = data.view(torch.int64).view(len(run), size // 8)
    else:
        words = _gathered(plan, buffers, run[0]).view(torch.int64).view(1, -1)
    weights = _weights(words.device, words.shape[1])
    return (words * weights).sum(dim=1)


def _gathered(plan: Plan, buffers: Sequence[torch.Tensor], index: int) -> torch.Tensor:
    """Chunk ``index``'s bytes in one buffer, zero-padded to whole words."""
    pieces = [buffers[slot][start:stop] for slot, start, stop in plan.pieces(index)]
    device = next((p.device for p in pieces if p.device.type != "cpu"), pieces[0].device)
    size = plan.chunk_bytes(index)
    out = torch.zeros(size + (-size % 8), dtype=torch.uint8, device=device)
    out[:size] = torch.cat([p.to(device) for p in pieces])
    return out


_weights_lock = threading.Lock()
_weights_cache: dict[tuple[torch.device, int], torch.Tensor] = {}


def _weights(device: torch.device, count: int) -> torch.Tensor:
    """``(2i + 1) * M`` for i < ``count`` as int64 (two's complement), cached per device and
    power-of-two length; never freed, so a stream still reading one is never cut short."""
    size = 1 << max(0, count - 1).bit_length()
    with _weights_lock:
        table = _weights_cache.get((device, size))
        if table is None:
            table = torch.arange(size, dtype=torch.int64, device=device) * 2 + 1
            table *= _M - (1 << 64)  # the same bits as _M, as a signed 64-bit number
            if device.type == "cuda":
                # Ready before any other stream reads it: this stream's work is enough; a
                # device synchronisation would also wait for the NCCL kernels of vLLM's ranks.
                torch.cuda.current_stream(device).synchronize()
            _weights_cache[(device, size)] = table
    return table[:count]
