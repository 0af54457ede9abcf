"""Raw byte views of tensors.

Weight bytes never pass through Python objects: sockets read and write straight into the
tensors' memory through the memoryviews made here.
"""

from __future__ import annotations

import ctypes

import torch


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
