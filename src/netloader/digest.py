"""Content digests that let a client prove every received byte equals what the server captured.

XXH3-64 (via the `xxhash` package): about 15 GB/s on one core of the development machine and
it releases the GIL, so each stream thread hashes its own chunks in parallel. It is not
cryptographic: it detects corruption and tensors that changed since capture, not a forger (the
optional shared-secret authentication is what keeps impostors out).
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash


def digest(buffers: Iterable[memoryview]) -> int:
    """XXH3-64 of the concatenation of ``buffers``."""
    h = xxhash.xxh3_64()
    for buf in buffers:
        h.update(buf)
    return h.intdigest()
