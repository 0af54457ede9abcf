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
#: torch's shareable-handle prefix: format version 2, memory from cudaMalloc (torch before 2.3
#: sent the bare 64-byte handle). Expandable segments ('e') are not accepted.
IPC_HANDLE_PREFIX = b"\x02c"
IPC_REF_SLOTS = 10_000  # counters in one of torch's IPC reference-counter files
MAX_STORAGE_BYTES = 1 << 48
_SHM_NAME = re.compile(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_GPU_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def ipc_handle_ok(raw: bytes) -> bool:
    """Whether ``raw`` is a CUDA IPC memory handle in a format the client opens."""
    return len(raw) == IPC_HANDLE_BYTES or (
        len(raw) == IPC_HANDLE_BYTES + len(IPC_HANDLE_PREFIX) and raw.startswith(IPC_HANDLE_PREFIX)
    )


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
        if not ipc_handle_ok(bytes.fromhex(handle)):
            raise ProtocolError("field 'handle' is not a CUDA IPC memory handle this client opens")
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
    value = text(o, key, 2 * (IPC_HANDLE_BYTES + len(IPC_HANDLE_PREFIX)))
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
    chunks travel over this connection as on the TCP transport."""

    kind: ClassVar[str] = "ipc_reply"
    ok: bool
    reason: str = ""

    @classmethod
    def from_json(cls, o: dict) -> IpcReply:
        return cls(typed(o, "ok", bool), text(o, "reason"))
