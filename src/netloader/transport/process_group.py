"""Weights over a torch.distributed process group created only for this pair of processes.

For device tensors: NCCL moves CUDA memory GPU to GPU and HCCL moves Ascend NPU memory, with no
host copy. Two processes on one GPU cannot use NCCL (it refuses two ranks on one device); on one
host the ``cuda_ipc`` transport is the device path. Rendezvous is kept apart from data movement, as in torch.distributed itself: the
server opens a private ``TCPStore`` on a free port and names it in its Accept; both sides then
build a two-rank backend object (server rank 0, client rank 1) on that store. The process's
global default group is never touched, so this works inside a vLLM worker that has its own.

Gloo is the same path for host tensors; the tests use it to run this module on a CPU machine.
The client asks for each chunk by index (an int64 message), the server answers with the chunk;
a chunk made of several small tensors is packed into one buffer so that the number of messages
stays small. One request is outstanding at a time: a group has a single stream.
"""

from __future__ import annotations

import datetime
import importlib.util
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from netloader.errors import ProtocolError
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.chunks import END, PING, answer_requests, request_chunks

SERVER_RANK, CLIENT_RANK = 0, 1


class ProcessGroupEngine(Engine):
    device_type: ClassVar[str]

    def supports(self, device: torch.device) -> bool:
        return device.type == self.device_type and dist.is_available() and self.backend_available()

    def backend_available(self) -> bool:
        return True

    def group(self, store: dist.Store, rank: int, host: str, timeout: float) -> Any:
        """This pair's process group of the backend, on ``store``."""
        raise NotImplementedError

    def sending(self, out: Outgoing) -> Sending:
        return GroupSending(out, self)

    # --- client ---------------------------------------------------------------------------

    def receive(self, inc: Incoming) -> None:
        group = self._join(inc)
        device = next((b.device for b in inc.buffers if b.numel()), torch.device("cpu"))
        stream = GroupAsking(group, inc, torch.empty(1, dtype=torch.int64, device=device))
        try:
            request_chunks(stream, inc, lambda: None, window=1)
            stream.send(END)
        finally:
            del group, stream

    def _join(self, inc: Incoming) -> Any:
        """Rendezvous on the server's store and build this pair's group."""
        port = inc.offer.get("store_port")
        if type(port) is not int or not 0 < port < 65536:
            raise ProtocolError("server's accept names no valid store_port for the process group")
        store = _timed(
            lambda: dist.TCPStore(
                inc.server_host, port, 2, is_master=False, timeout=_delta(inc.idle)
            ),
            inc.idle,
        )
        prefixed = dist.PrefixStore(inc.session, store)
        return _timed(
            lambda: self.group(prefixed, CLIENT_RANK, inc.server_host, inc.idle), inc.idle
        )


class GroupSending(Sending):
    """The server's side: a private TCPStore for the rendezvous, then chunk requests answered
    on the pair's group."""

    def __init__(self, out: Outgoing, engine: ProcessGroupEngine):
        super().__init__(out)
        self.engine = engine
        self.store: dist.TCPStore | None = None
        self.group: Any = None
        self.request: torch.Tensor | None = None

    def offer(self) -> dict[str, Any]:
        out = self.out
        self.store = dist.TCPStore(
            out.host, 0, 2, is_master=True, timeout=_delta(out.idle), wait_for_workers=False
        )
        return {"store_port": self.store.port}

    def send(self) -> None:
        """Answer the client's chunk requests (an int64 index each, as in ``chunks``)."""
        assert self.store is not None, "offer() must run before send()"
        out = self.out
        store = dist.PrefixStore(out.session, self.store)
        self.group = _timed(
            lambda: self.engine.group(store, SERVER_RANK, out.host, out.idle), out.idle
        )
        self.request = torch.empty(1, dtype=torch.int64, device=out.snapshot.device)
        try:
            answer_requests(self._next_request, out, lambda: None, self._answer)
        finally:
            self.close()

    def _next_request(self) -> int:
        _move(self.group.recv, self.request, CLIENT_RANK, self.out.idle)
        return int(self.request.item())

    def _answer(self, index: int) -> None:
        out = self.out
        out.snapshot.wait_ready(index, out.idle)  # a relay may still be receiving it
        out.check(index)
        pieces = [out.snapshot.buffers[s][a:b] for s, a, b in out.snapshot.plan.pieces(index)]
        chunk = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        out.pace(index)
        _move(self.group.send, chunk, CLIENT_RANK, out.idle)

    def close(self) -> None:
        self.store = self.group = None


class GroupAsking:
    """Requests as int64 tensors on the pair's group, one chunk at a time (``chunks.Asking``)."""

    def __init__(self, group: Any, inc: Incoming, request: torch.Tensor):
        self.group = group
        self.inc = inc
        self.request = request

    def send(self, index: int) -> None:
        self.request.fill_(index)
        _move(self.group.send, self.request, SERVER_RANK, self.inc.idle)

    def ask(self, indices: list[int]) -> None:
        (index,) = indices  # a window of one
        self.send(index)

    def ping(self) -> None:
        self.send(PING)

    def land(self, asked: deque[int]) -> list[int]:
        index = asked.popleft()
        receive_chunk(self.group, self.inc, index)
        self.inc.verify(index)
        return [index]


def receive_chunk(group: Any, inc: Incoming, index: int) -> None:
    """Chunk ``index`` straight into its tensor, or through one buffer when it spans several."""
    pieces = [inc.buffers[s][a:b] for s, a, b in inc.plan.pieces(index)]
    if len(pieces) == 1:
        chunk = pieces[0]
    else:
        chunk = torch.empty(inc.plan.chunk_bytes(index), dtype=torch.uint8, device=pieces[0].device)
    inc.wrote = True
    _move(group.recv, chunk, SERVER_RANK, inc.idle)
    if len(pieces) > 1:
        offset = 0
        for piece in pieces:
            piece.copy_(chunk[offset : offset + piece.numel()])
            offset += piece.numel()


class GlooEngine(ProcessGroupEngine):
    name = "gloo"
    device_type = "cpu"

    def group(self, store: dist.Store, rank: int, host: str, timeout: float) -> Any:
        return gloo_pair(store, rank, host, timeout)


class NcclEngine(ProcessGroupEngine):
    name = "nccl"
    device_type = "cuda"

    def backend_available(self) -> bool:
        return dist.is_nccl_available() and torch.cuda.is_available()

    def group(self, store: dist.Store, rank: int, host: str, timeout: float) -> Any:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _delta(timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, options)


class HcclEngine(ProcessGroupEngine):
    """Ascend NPUs via torch_npu. Not exercised in this project's CI (no NPU here)."""

    name = "hccl"
    device_type = "npu"

    def backend_available(self) -> bool:
        return importlib.util.find_spec("torch_npu") is not None

    def group(self, store: dist.Store, rank: int, host: str, timeout: float) -> Any:
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # type: ignore[import-not-found]

        options = ProcessGroupHCCL.Options()
        options._timeout = _delta(timeout)
        return ProcessGroupHCCL(store, rank, 2, options)


def gloo_pair(store: dist.Store, rank: int, host: str, timeout: float) -> Any:
    """A two-rank gloo group on ``store``, bound to ``host`` (the peer-facing address, not
    whatever the hostname resolves to)."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = _delta(timeout)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, 2, options)


T = TypeVar("T")


def _move(op: Callable[..., Any], chunk: torch.Tensor, peer: int, limit: float) -> None:
    """One send or receive of ``chunk`` to or from ``peer``, waiting at most ``limit`` s."""
    _timed(lambda: op([chunk], peer, 0).wait(_delta(limit)), limit)


def _timed(call: Callable[[], T], limit: float) -> T:
    """Run a torch.distributed call that waits at most ``limit`` seconds, turning its failures
    into builtin errors. Backends raise plain RuntimeErrors for timeouts and broken peers alike
    (gloo: "Timed out waiting ...", "Application timeout caused pair closure"), so a failure
    after waiting the whole limit is a TimeoutError, anything sooner a ConnectionError."""
    start = time.monotonic()
    try:
        return call()
    except RuntimeError as exc:
        waited = time.monotonic() - start
        if waited >= 0.95 * limit:
            raise TimeoutError(f"process group: no progress for {waited:.1f} s: {exc}") from None
        raise ConnectionError(f"process group: {exc}") from None


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
