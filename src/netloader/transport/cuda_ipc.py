"""Same host, CUDA tensors: the client copies the served tensors device to device (CUDA IPC).

When to use it. The client proposes ``cuda_ipc`` first (``transport.preferred``) when its
destination is on a CUDA device and the source's address is one of this machine's own (binding
to it succeeds: same network namespace, so the same kernel and driver). That is decided before
the request, from facts the client has, and sends no host identifier anywhere. The server takes
it only if its tensors are on one CUDA device and the client's connection comes from one of its
own addresses; otherwise the next transport the client named (TCP) is used. Containers on one
host in separate network namespaces therefore use TCP: conservative, never wrong.

The data connection. After the authenticated handshake the client attaches one data
connection, as on the TCP transport (the session id from the Accept is its ticket). On it:

1. server -> ``IpcOffer``: for each storage holding served bytes, torch's CUDA IPC handle
   (``UntypedStorage._share_cuda_``) as hex strings and bounded integers, and per slot where
   its bytes start. Never pickle: ``cuda_ipc_wire.IpcOffer`` checks every field and the client checks
   the slots against its own plan before it opens anything.
2. client -> ``IpcReply``: ok once it opened every handle (torch's ``rebuild_cuda_tensor``) on
   the server's GPU, found by UUID: its destination's GPU, or one it has peer access to. If
   not, ok=false with the reason and how many of the storages it had opened (the server
   releases torch's reference counters of the others, which nobody else would), and the
   transfer's streams then carry the chunks as on TCP (device staging included): falling back
   costs no second handshake. The client attaches the usual number of data connections; only
   the first carries the offer, the others wait for the reply and then either end at once
   (IPC) or run as TCP streams.
3. The client asks for chunks by index as on TCP, up to ``WINDOW`` outstanding; the server
   answers each with the index alone once the chunk may be read (a relay may still be
   receiving it; ``verify_before_send`` re-checks it first), or with a refusal. The client
   copies the answered chunks out of the mapped storages on its own stream (adjacent pieces as
   one copy), verifies them on its device, and marks them done.
4. When the board is finished the client synchronises, drops its mappings and ends the stream.
   The server holds its extra references to the shared storages until the session ends.

What it grants. A client that maps the handles can read and write the whole CUDA allocations
holding the served tensors: CUDA IPC has no read-only mapping, and torch's caching allocator may
place other tensors of the server in the same allocation. Only a client that passed the
handshake (with the server's token, when it has one) learns the session, and only a process on
the server's host can open a handle. ``ServeOptions.cuda_ipc=False`` turns it off.

Not covered: memory from torch's expandable segments (the server then says why and the client
falls back to TCP), and more than one device per server.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

import torch

from netloader.errors import ProtocolError
from netloader.plan import Plan
from netloader.protocol import MAX_STREAMS, MAX_TEXT, Channel, encode
from netloader.snapshot import Snapshot
from netloader.sockets import is_local, kernel_timeouts
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.chunks import CHUNK_HEADER, END, Mark, request_chunks
from netloader.transport.cuda_ipc_copy import Copier, answers, destination_device
from netloader.transport.cuda_ipc_wire import (
    IpcOffer,
    IpcReply,
    IpcStorage,
    for_local_torch,
    ipc_handle_problem,
    torch_handle_version,
)
from netloader.transport.streams import AttachedSending, Streams
from netloader.transport.tcp import (
    SocketAsking,
    TcpEngine,
    fetch_stream,
    open_stream,
    serve_stream,
)

if TYPE_CHECKING:
    from netloader.options import ServeOptions

log = logging.getLogger("netloader.transport")

#: Chunk requests a client keeps outstanding (1 GiB of 4 MiB chunks): an answer carries no
#: bytes, and the more answers have arrived, the more chunks one round of copies and one
#: synchronisation cover. (A source holds the chunks it asked for until it fails.)
WINDOW = 256


class CudaIpcEngine(Engine):
    name = "cuda_ipc"
    #: The copies run on the first data connection; the others carry the chunks only if the
    #: client cannot map the storages (then as many streams as over TCP).
    max_streams = MAX_STREAMS
    messages = (IpcOffer, IpcReply)

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def reaches(self, peer_host: str) -> bool:
        return is_local(peer_host)

    def enabled(self, options: ServeOptions) -> bool:
        return options.cuda_ipc

    def proposes(self, device: torch.device, source_host: str | None) -> bool:
        return source_host is not None and self.supports(device) and is_local(source_host)

    def sending(self, out: Outgoing) -> Sending:
        return IpcSending(out)

    def receive(self, inc: Incoming) -> None:
        IpcReceiving(inc).run()


class IpcSending(AttachedSending):
    """One data connection, as on TCP; on it the offer of the storages, then chunk indices."""

    def __init__(self, out: Outgoing):
        super().__init__(out)
        #: Storages the client may map, held until the session ends.
        self._shared: list[torch.UntypedStorage] = []

    def send(self) -> None:
        self.run_streams(self._serve)

    def close(self) -> None:
        super().close()
        self._shared = []

    def _serve(self, sock: socket.socket, mark: Mark) -> None:
        out = self.out
        if self.attachments.index_of(sock):  # a further stream: used only if IPC is not
            serve_stream(sock, out, mark)
            return
        offer, self._shared = share(out.snapshot)
        try:
            encode(offer)
        except ProtocolError as exc:  # more storages than a frame holds
            release_counters(offer.storages)
            offer, self._shared = _cannot(str(exc)), []
        channel = Channel(sock, out.idle)
        channel.send(offer)
        try:
            reply = channel.recv(IpcReply)
        except BaseException:  # the client is gone or broken: nobody else releases them
            release_counters(offer.storages)
            raise
        release_counters(offer.storages[reply.opened(len(offer.storages)) :])
        mark()
        if not reply.ok:
            log.warning(
                "CUDA IPC not possible for this client (%s): sending over TCP", reply.reason
            )
        serve_stream(sock, out, mark, payload=not reply.ok)


class IpcReceiving:
    """The client's streams of one source: the first maps the offer and copies; the others
    wait for its verdict, then end (IPC) or receive as TCP streams (the offer was refused)."""

    def __init__(self, inc: Incoming):
        self.inc = inc
        self.cancelled = threading.Event()
        self.decided = threading.Event()
        self.over_tcp = False
        self.first: socket.socket | None = None

    def run(self) -> None:
        Streams(self.inc.streams, self.inc.idle, self.cancelled).run(self._open, self._work)

    def _open(self, index: int) -> socket.socket:
        sock = open_stream(self.inc, index)
        if index == 0:
            self.first = sock
        return sock

    def _work(self, sock: socket.socket, mark: Mark) -> None:
        if sock is self.first:
            self._fetch(sock, mark)
            return
        while not self.decided.wait(0.25):  # the first stream's offer and reply
            if self.cancelled.is_set():
                return
            mark()
        if self.over_tcp:
            fetch_stream(sock, self.inc, mark)
        else:
            sock.sendall(CHUNK_HEADER.pack(END))

    def _decide(self, over_tcp: bool) -> None:
        self.over_tcp = over_tcp
        self.decided.set()

    def _fetch(self, sock: socket.socket, mark: Mark) -> None:
        """Map the server's storages and copy the chunks the board hands this source; or, if
        they cannot be mapped here, receive them as on TCP (on every stream)."""
        inc = self.inc
        channel = Channel(sock, inc.idle)
        offer = channel.recv(IpcOffer)
        check_offer(offer, inc.plan)
        sources, opened = map_offer(offer, inc)
        if isinstance(sources, str):
            log.warning("%s: CUDA IPC not possible (%s); receiving over TCP", inc.source, sources)
            channel.send(IpcReply(False, sources[:MAX_TEXT], opened))
            inc.transport = TcpEngine.name
            self._decide(over_tcp=True)
            fetch_stream(sock, inc, mark)
            return
        channel.send(IpcReply(True, "", opened))
        inc.streams = 1
        self._decide(over_tcp=False)
        mark()
        copier = Copier(inc, sources)
        del sources
        kernel_timeouts(sock, inc.idle)
        stream = SocketAsking(sock, lambda asked: copier.copy(answers(sock, inc, asked)))
        try:
            request_chunks(stream, inc, mark, WINDOW)
        finally:
            copier.release()
        stream.end()


# --- the server's offer -------------------------------------------------------------------


def share(snapshot: Snapshot) -> tuple[IpcOffer, list[torch.UntypedStorage]]:
    """The offer of ``snapshot``'s storages and the storages to hold while a client may map
    them; or an offer that only says why they cannot be shared."""
    device = snapshot.device
    if device.type != "cuda":
        return _cannot("the served tensors are not all on one CUDA device"), []
    storages: list[IpcStorage] = []
    slots: list[list[int] | None] = []
    keep: list[torch.UntypedStorage] = []
    seen: dict[int, int] = {}
    try:
        for buf in snapshot.buffers:
            if buf.numel() == 0:
                slots.append(None)
                continue
            storage = buf.untyped_storage()
            if storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = len(storages)
                storages.append(_describe(storage._share_cuda_()))
                keep.append(storage)
            slots.append([seen[storage.data_ptr()], buf.data_ptr() - storage.data_ptr()])
        gpu = gpu_id(device.index or 0)
    except (RuntimeError, ValueError, AttributeError) as exc:
        return _cannot(f"cannot share the served tensors: {exc}"), []
    return IpcOffer(gpu, storages, slots), keep


def _describe(shared: tuple) -> IpcStorage:
    """torch's ``_share_cuda_()`` tuple as plain JSON-safe fields."""
    _device, handle, size, offset, ref, ref_offset, event, sync = shared
    storage = IpcStorage(
        handle.hex(), size, offset, ref.decode(), ref_offset, event.hex(), bool(sync)
    )
    problem = ipc_handle_problem(handle)
    if problem:
        release_counters([storage])
        raise ValueError(f"torch made a CUDA IPC handle this transport does not map: {problem}")
    return storage


def release_counters(storages: list[IpcStorage]) -> None:
    """Release torch's IPC reference counters of ``storages``, offered but not mapped by the
    client. Each ``_share_cuda_`` sets one to 1 and a mapping client's torch decrements it when
    it drops the mapping; a block freed while its counter is above 0 waits in torch's limbo
    (``CudaIPCSentDataLimbo``, ``torch/csrc/CudaIPCTypes.cpp``), so without this the memory of
    a storage nobody mapped would never be returned. What the consumer does for a storage it
    already holds (``torch/multiprocessing/reductions.py``, ``rebuild_cuda_tensor``)."""
    for storage in storages:
        try:
            torch.UntypedStorage._release_ipc_counter_cuda(storage.ref.encode(), storage.ref_offset)
        except (RuntimeError, AttributeError) as exc:  # nothing to release it for
            log.warning("cannot release a CUDA IPC reference counter: %s", exc)


def _cannot(reason: str) -> IpcOffer:
    return IpcOffer("", [], [], reason[:MAX_TEXT])


def gpu_id(index: int) -> str:
    """The UUID of CUDA device ``index``: the same GPU has the same one in every process,
    whatever CUDA_VISIBLE_DEVICES numbers it."""
    return str(torch.cuda.get_device_properties(index).uuid)


# --- the client's side of the offer -------------------------------------------------------


def check_offer(offer: IpcOffer, plan: Plan) -> None:
    """Raise ProtocolError unless ``offer`` places every slot of ``plan`` inside a storage."""
    if offer.reason:
        return
    if len(offer.slots) != len(plan.sizes):
        raise ProtocolError(f"the IPC offer has {len(offer.slots)} slots for {len(plan.sizes)}")
    for number, (slot, size) in enumerate(zip(offer.slots, plan.sizes, strict=True)):
        if size and slot is None:
            raise ProtocolError(f"the IPC offer leaves out slot {number} ({size} bytes)")
        if slot is not None and slot[1] + size > offer.storages[slot[0]].size:
            raise ProtocolError(f"the IPC offer places slot {number} beyond its storage")


def map_offer(offer: IpcOffer, inc: Incoming) -> tuple[list[torch.Tensor | None] | str, int]:
    """Each slot's bytes in the server's memory, mapped here, or why that is not possible; and
    how many of the offered storages were opened (in order: their counters are this side's to
    release, by dropping them)."""
    if offer.reason:
        return f"the server cannot share its tensors: {offer.reason}", 0
    local = usable_gpu(offer.gpu, destination_device(inc))
    if isinstance(local, str):
        return local, 0
    opened: list[torch.Tensor] = []
    try:
        for storage in offer.storages:
            opened.append(_open(storage, local))
    except RuntimeError as exc:
        count = len(opened)
        opened.clear()  # dropped: torch releases their counters
        return f"cannot open the server's CUDA IPC handles: {exc}", count
    sources: list[torch.Tensor | None] = [
        None if slot is None else opened[slot[0]][slot[1] : slot[1] + size]
        for slot, size in zip(offer.slots, inc.plan.sizes, strict=True)
    ]
    return sources, len(opened)


def usable_gpu(gpu: str, device: torch.device) -> int | str:
    """The index here of the server's GPU ``gpu`` if a copy from it into ``device`` can stay on
    devices (the same GPU, or one with peer access); else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "this client's destination is not on a CUDA device"
    try:
        local = next((i for i in range(torch.cuda.device_count()) if gpu_id(i) == gpu), None)
    except (RuntimeError, AttributeError) as exc:
        return f"cannot identify this machine's GPUs: {exc}"
    if local is None:
        return f"the server's GPU {gpu} is not visible to this process"
    mine = device.index or 0
    if local != mine and not torch.cuda.can_device_access_peer(mine, local):
        return f"GPU {mine} has no peer access to the server's GPU {local}"
    return local


def _open(storage: IpcStorage, device: int) -> torch.Tensor:
    """The server's storage as a flat uint8 tensor, mapped on GPU ``device`` the way
    ``torch.multiprocessing`` maps a CUDA tensor it received."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        (storage.size,),
        (1,),
        0,
        torch.storage.TypedStorage,
        torch.uint8,
        device,
        for_local_torch(bytes.fromhex(storage.handle), torch_handle_version(torch.__version__)),
        storage.size,
        storage.offset,
        False,
        storage.ref.encode(),
        storage.ref_offset,
        bytes.fromhex(storage.event),
        storage.sync,
    )
