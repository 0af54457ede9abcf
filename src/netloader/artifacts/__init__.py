"""Compile artifacts that travel beside the weights: kernels a warm instance already built.

An instance that compiles its model (vLLM's torch.compile: an AOT function and inductor
kernels) leaves a cache entry on disk, one directory per key. A new replica that asks its
source for the entry under the key it will use itself finds a warm cache and skips most of
its compile. Artifacts are native code the receiver will run, so they travel only between
peers that proved a shared token (unless a trusted network is declared), every file is
checked against the digest its offer names, and an entry is installed whole or not at all.

- ``kinds``: which caches exist (``Kind``: where its entries live, when one is complete).
- ``entry``: an entry on disk (its files, digests and the factors it was built for).
- ``wire``: the request and the offer on the control connection.
- ``install``: receiving an offered entry into a cache root, atomically.
"""

from netloader.artifacts.entry import Entry, FileDigest, describe_difference
from netloader.artifacts.kinds import KINDS, VLLM_TORCH_COMPILE, Kind, register_kind

__all__ = [
    "KINDS",
    "VLLM_TORCH_COMPILE",
    "Entry",
    "FileDigest",
    "Kind",
    "describe_difference",
    "register_kind",
]
