"""Data-plane transports, by name. See ``base`` for the interface."""

from __future__ import annotations

import torch

from netloader.sockets import is_local
from netloader.transport.base import Incoming, Outgoing, Transport
from netloader.transport.cuda_ipc import CudaIpcTransport
from netloader.transport.process_group import GlooTransport, HcclTransport, NcclTransport
from netloader.transport.tcp import TcpTransport

TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t for t in (TcpTransport, CudaIpcTransport, NcclTransport, HcclTransport, GlooTransport)
}


def preferred(device: torch.device, source_host: str | None = None) -> list[str]:
    """Transports a client with tensors on ``device`` proposes to a source at ``source_host``,
    best first, ending with TCP (which any server can use). A CUDA client proposes CUDA IPC to
    a source on this machine, and no process group there: NCCL cannot pair two processes on
    one GPU, and on one host IPC does what it would. Elsewhere, a device process group."""
    if source_host is not None and CudaIpcTransport.supports(device) and is_local(source_host):
        return [CudaIpcTransport.name, TcpTransport.name]
    names = [t.name for t in (NcclTransport, HcclTransport) if t.supports(device)]
    return [*names, TcpTransport.name]


__all__ = ["TRANSPORTS", "Incoming", "Outgoing", "Transport", "preferred"]
