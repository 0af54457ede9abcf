"""Where the bytes of one accepted pull land: the caller's tensors, fresh ones allocated from the
server's manifest (bounded first), or ones a callback returns (e.g. views of a file).

``Landing`` holds that choice before any source answered; ``Landing.prepare`` makes the
``Destination`` of an Accept: the tensors, one flat buffer per slot and the chunk plan."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from netloader.errors import ConfigError, PullError
from netloader.manifest import Manifest
from netloader.plan import Plan
from netloader.protocol import Accept
from netloader.tensors import flat_bytes

Allocate = Callable[[Manifest], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Landing:
    """Where an accepted pull's bytes will land, decided before any source answered: ``into``
    (the caller's tensors), else ``allocate(manifest)``, else fresh tensors on ``device`` (at
    most ``max_bytes`` in all)."""

    into: Mapping[str, torch.Tensor] | None
    allocate: Allocate | None
    device: torch.device
    max_bytes: int | None

    def prepare(self, accept: Accept) -> Destination:
        """The destination for ``accept``: ``into`` (already checked against the manifest by
        the server and again by the client), ``allocate(manifest)``, or fresh tensors."""
        if self.into is not None:
            tensors = dict(self.into)
        elif self.allocate is not None:
            tensors = dict(self.allocate(accept.manifest))
            if Manifest.of(tensors) != accept.manifest:
                raise ValueError("allocate() returned tensors that differ from the manifest")
        else:
            tensors = _fresh(accept, self.device, self.max_bytes)
        return Destination(tensors, accept)


class Destination:
    """The destination tensors in the manifest's order, a flat uint8 buffer per slot for the
    transport (an empty one for aliases; a contiguous scratch copy for non-contiguous tensors)
    and the chunk plan over those buffers."""

    def __init__(self, tensors: dict[str, torch.Tensor], accept: Accept):
        self.tensors = tensors
        self.ordered = [tensors[s.name] for s in accept.manifest.specs]
        self.aliases = accept.aliases
        self.buffers: list[torch.Tensor] = []
        self.scratch: dict[int, torch.Tensor] = {}
        for i, t in enumerate(self.ordered):
            if i in self.aliases:
                self.buffers.append(torch.empty(0, dtype=torch.uint8))
            elif t.is_contiguous():
                self.buffers.append(flat_bytes(t))
            else:
                self.scratch[i] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                self.buffers.append(flat_bytes(self.scratch[i]))
        self.plan = Plan([b.numel() for b in self.buffers], accept.chunk_size)
        if accept.digests is not None and len(accept.digests) != self.plan.num_chunks:
            raise PullError(
                f"server sent {len(accept.digests)} digests for {self.plan.num_chunks} chunks"
            )

    def finish(self) -> None:
        """After every chunk landed: copy scratch space into non-contiguous tensors, and fill
        tied tensors that the caller keeps in separate memory."""
        with torch.no_grad():
            for i, tmp in self.scratch.items():
                self.ordered[i].copy_(tmp)
            for i, j in self.aliases.items():
                dst, src = self.ordered[i], self.ordered[j]
                if not (dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()):
                    dst.copy_(src)


def device_of(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ConfigError(
            f"destination tensors are on several devices: {sorted(map(str, devices))}"
        )
    return devices.pop()


def _fresh(accept: Accept, device: torch.device, max_bytes: int | None) -> dict[str, torch.Tensor]:
    total = accept.manifest.total_bytes
    limit = max_bytes if max_bytes is not None else _physical_memory()
    if total > limit:
        raise PullError(
            f"server offers {total / 1e9:.2f} GB, more than the allowed {limit / 1e9:.2f} GB (max_bytes)"
        )
    out: dict[str, torch.Tensor] = {}
    specs = accept.manifest.specs
    for i, spec in enumerate(specs):
        target = accept.aliases.get(i)
        out[spec.name] = (
            out[specs[target].name]
            if target is not None
            else torch.empty(spec.shape, dtype=spec.dtype, device=device)
        )
    return out


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
