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
stays small. One request is outstanding at a time: a group has a single stream. The client's
last request is ``END``; the server answers it with ``END`` (so the client knows it arrived)
and both sides shut the group down (``shutdown()``: the communicators are finalised, not
aborted with work in flight).

A failed peer costs only its transfer. An NCCL pair group is built with blocking wait and
without torch's async error handling (``TORCH_NCCL_BLOCKING_WAIT=1``,
``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``, read by ``ProcessGroupNCCL``'s constructor): by default
(3) its watchdog rethrows a timeout or a remote error and ends the whole process, inside a
vLLM worker taking inference down with it; with blocking wait the error is raised by the
``wait()`` of the transfer's own thread, and the transfer fails over to another source. The
settings are set only while this pair's group is built (under a lock) and restored at once.
NCCL communicators used alongside vLLM's own are a documented NCCL hazard (README: "NCCL
alongside vLLM"): on one host, CUDA IPC is the device path.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from netloader.errors import ProtocolError
from netloader.transport.base import Engine, Incoming, Outgoing, Sending
from netloader.transport.chunks import END, PING, answer_requests, request_chunks

SERVER_RANK, CLIENT_RANK = 0, 1
#: Read by torch's ``ProcessGroupNCCL`` constructor for that group (torch 2.13,
#: ``torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp``): errors raised in ``wait()``, no
#: watchdog that ends the process.
PAIR_NCCL_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}

log = logging.getLogger("netloader.transport")
_env_lock = threading.Lock()


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
        ended = False
        try:
            request_chunks(stream, inc, lambda: None, window=1)
            stream.send(END)
            ended = acknowledged(group, stream.request, inc.idle)
        finally:
            finish(group, ended)
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
        self.ended = False
        try:
            answer_requests(self._next_request, out, lambda: None, self._answer)
            if self.ended:  # tell the client its END arrived, then both sides shut down
                self.ended = False
                _move(self.group.send, self.request, CLIENT_RANK, out.idle)
                self.ended = True
        finally:
            finish(self.group, self.ended)
            self.close()

    def _next_request(self) -> int:
        _move(self.group.recv, self.request, CLIENT_RANK, self.out.idle)
        index = int(self.request.item())
        self.ended = index == END
        return index

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
        with pair_environment(PAIR_NCCL_ENV):
            return dist.ProcessGroupNCCL(store, rank, 2, options)


@contextlib.contextmanager
def pair_environment(settings: dict[str, str]) -> Iterator[None]:
    """``settings`` in the environment while one pair group is built, restored afterwards;
    one group at a time (a lock), so two transfers never see each other's values."""
    with _env_lock:
        before = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def acknowledged(group: Any, request: torch.Tensor, limit: float) -> bool:
    """Wait for the server's answer to END; False (logged) if it does not come: every chunk is
    in place already, only the group's shutdown is then an abort."""
    try:
        _move(group.recv, request, SERVER_RANK, limit)
        return int(request.item()) == END
    except (TimeoutError, ConnectionError) as exc:
        log.warning("process group: the server did not acknowledge END (%s)", exc)
        return False


def finish(group: Any, ended: bool) -> None:
    """Shut ``group`` down after an acknowledged END, abort it otherwise (a failed peer: no
    collective call may wait on it); a backend without either is left to its destructor."""
    if group is None:
        return
    end = getattr(group, "shutdown" if ended else "abort", None)
    if end is not None:
        try:
            end()
        except RuntimeError as exc:
            log.warning("process group: %s failed: %s", "shutdown" if ended else "abort", exc)


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
