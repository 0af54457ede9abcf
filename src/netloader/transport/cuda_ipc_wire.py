"""The messages of a ``cuda_ipc`` data connection, once its session attached: the server's
offer of CUDA IPC handles and the client's reply. Plain JSON, every field bounded: never pickle
(see ``cuda_ipc`` for the exchange)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from netloader.errors import ProtocolError
from netloader.manifest import MAX_TENSORS
from netloader.protocol import MAX_FRAME, Message
from netloader.protocol.fields import bounded, hex_field, text, typed

IPC_HANDLE_BYTES = 64  # a cudaIpcMemHandle_t or cudaIpcEventHandle_t
#: The newest format version of torch's shareable handles (``[version][type][64 bytes]``) this
#: module has read: 2 up to torch 2.12, 3 from torch 2.13 with the same ``'c'`` payload
#: (NVIDIA-NeMo/RL PR #4080, ``nemo_rl/utils/cuda_ipc.py``). torch before 2.3 sent the bare
#: 64-byte handle.
IPC_HANDLE_VERSION = 3
#: The handle type of memory from cudaMalloc; expandable segments (``'e'``) carry another
#: payload (a file descriptor to fetch through pidfd), not opened here.
IPC_CUDA_MALLOC = ord("c")
IPC_EXPANDABLE = ord("e")
#: Bytes a versioned handle may carry: torch's consumer reads the 64-byte payload after the
#: two-byte header and ignores what follows, so a longer one is opened too, within this bound.
MAX_IPC_HANDLE = 256
IPC_REF_SLOTS = 10_000  # counters in one of torch's IPC reference-counter files
MAX_STORAGE_BYTES = 1 << 48
_SHM_NAME = re.compile(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_GPU_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def ipc_handle_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a CUDA IPC memory handle this client opens, or None if it is.

    The same test as torch's consumer (``MemHandleCacheEntry`` in
    ``c10/cuda/CUDACachingAllocator.cpp``): a handle of exactly 64 bytes is a bare
    ``cudaIpcMemHandle_t`` from a torch before versioning; any other starts with a version
    byte, refused only when newer than the newest known, and a type byte, of which only
    cudaMalloc memory is opened here (expandable segments are not)."""
    if len(raw) == IPC_HANDLE_BYTES:
        return None
    if not 2 + IPC_HANDLE_BYTES <= len(raw) <= MAX_IPC_HANDLE:
        return f"{len(raw)} bytes, not 64 or 66..{MAX_IPC_HANDLE}"
    version, kind = raw[0], raw[1]
    if not 1 <= version <= IPC_HANDLE_VERSION:
        return f"format version {version}, newer than the known {IPC_HANDLE_VERSION}"
    if kind == IPC_EXPANDABLE:
        return "memory from torch's expandable segments, which this transport does not map"
    if kind != IPC_CUDA_MALLOC:
        return f"handle type {kind:#04x}, not cudaMalloc memory ('c')"
    return None


def ipc_handle_ok(raw: bytes) -> bool:
    """Whether ``raw`` is a CUDA IPC memory handle in a format the client opens."""
    return ipc_handle_problem(raw) is None


def for_local_torch(raw: bytes, local_version: int) -> bytes:
    """``raw`` as the local torch reads it: a cudaMalloc handle of a newer version than the
    local torch's (``local_version``) with the same payload gets the local version byte (the
    ``'c'`` payload is the same in versions 2 and 3, so a torch 2.12 client opens a torch 2.13
    server's handles, as NeMo-RL does); anything else unchanged."""
    if len(raw) == IPC_HANDLE_BYTES or raw[1] != IPC_CUDA_MALLOC or raw[0] <= local_version:
        return raw
    return bytes([local_version]) + raw[1:]


def torch_handle_version(version: str) -> int:
    """The shareable-handle version a torch of ``version`` ("2.13.0+cu128") writes and
    accepts: 3 from 2.13, else 2."""
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return 3 if (major, minor) >= (2, 13) else 2


@dataclass
class IpcStorage:
    """One CUDA storage a server shares, as torch's ``_share_cuda_`` describes it: the IPC
    handle of the allocation that holds it (hex), the storage's size and offset in that
    allocation, torch's reference counter for it (a shared-memory name and a slot) and the
    event (hex) to wait on before reading."""

    handle: str
    size: int
    offset: int
    ref: str
    ref_offset: int
    event: str
    sync: bool

    @classmethod
    def from_json(cls, o: Any) -> IpcStorage:
        if not isinstance(o, dict) or set(o) != _STORAGE_FIELDS:
            raise ProtocolError(
                f"each IPC storage must be an object with {sorted(_STORAGE_FIELDS)}"
            )
        handle = _hex_text(o, "handle")
        problem = ipc_handle_problem(bytes.fromhex(handle))
        if problem:
            raise ProtocolError(f"field 'handle' is not a CUDA IPC memory handle: {problem}")
        ref = text(o, "ref", 200)
        if not _SHM_NAME.fullmatch(ref):
            raise ProtocolError("field 'ref' is not a shared-memory name")
        return cls(
            handle=handle,
            size=bounded(o, "size", 1, MAX_STORAGE_BYTES),
            offset=bounded(o, "offset", 0, MAX_STORAGE_BYTES),
            ref=ref,
            ref_offset=bounded(o, "ref_offset", 0, IPC_REF_SLOTS - 1),
            event=hex_field(o, "event", IPC_HANDLE_BYTES),
            sync=typed(o, "sync", bool),
        )


_STORAGE_FIELDS = {"handle", "size", "offset", "ref", "ref_offset", "event", "sync"}


def _hex_text(o: dict, key: str) -> str:
    """Field ``key``: an even-length hex string of at most an IPC handle's size."""
    value = text(o, key, 2 * MAX_IPC_HANDLE)
    if len(value) % 2 or not all(c in "0123456789abcdefABCDEF" for c in value):
        raise ProtocolError(f"field {key!r} must be hex")
    return value


@dataclass
class IpcOffer(Message):
    """Server -> client: the storages holding the served tensors and, per slot of the plan,
    ``[storage, byte offset]`` where its bytes start (None: a slot without bytes); or, with a
    ``reason``, why the server cannot share them (the connection then carries the chunks over
    TCP). ``gpu`` is the UUID of the server's GPU."""

    kind: ClassVar[str] = "ipc_offer"
    limit: ClassVar[int] = MAX_FRAME
    gpu: str
    storages: list[IpcStorage]
    slots: list[list[int] | None]
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "gpu": self.gpu,
            "storages": [asdict(s) for s in self.storages],
            "slots": self.slots,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, o: dict) -> IpcOffer:
        reason = text(o, "reason")
        gpu = text(o, "gpu", 64)
        if not reason and not _GPU_ID.fullmatch(gpu):
            raise ProtocolError("field 'gpu' must be a GPU UUID")
        storages = typed(o, "storages", list)
        slots = typed(o, "slots", list)
        if max(len(storages), len(slots)) > MAX_TENSORS:
            raise ProtocolError(f"an IPC offer lists more than {MAX_TENSORS} storages or slots")
        return cls(
            gpu, [IpcStorage.from_json(s) for s in storages], _slots(slots, storages), reason
        )


def _slots(slots: list, storages: list) -> list[list[int] | None]:
    for slot in slots:
        if slot is not None and not (
            isinstance(slot, list)
            and len(slot) == 2
            and all(type(x) is int for x in slot)
            and 0 <= slot[0] < len(storages)
            and 0 <= slot[1] < MAX_STORAGE_BYTES
        ):
            raise ProtocolError("each IPC slot must be null or [storage index, byte offset]")
    return slots


@dataclass
class IpcReply(Message):
    """Client -> server: whether it mapped the offered storages; if not (``reason``), the
    chunks travel over the transfer's streams as on the TCP transport. ``mapped``: how many of
    the offered storages, from the first, it opened (None: all if ok, else none); the server
    releases the reference counters of the others."""

    kind: ClassVar[str] = "ipc_reply"
    ok: bool
    reason: str = ""
    mapped: int | None = None

    def opened(self, offered: int) -> int:
        """How many of ``offered`` storages the client opened (and releases itself)."""
        if self.mapped is None:
            return offered if self.ok else 0
        return min(self.mapped, offered)

    @classmethod
    def from_json(cls, o: dict) -> IpcReply:
        mapped = None if o.get("mapped") is None else bounded(o, "mapped", 0, MAX_TENSORS)
        return cls(typed(o, "ok", bool), text(o, "reason"), mapped)
