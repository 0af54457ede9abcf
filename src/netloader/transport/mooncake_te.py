"""This process's Mooncake TransferEngine: imported on first use, started once, each memory
region registered once (by storage: the engine refuses overlapping regions) and held for as
long as anyone in the process uses it.

One engine serves every server and client of the process (a relay is both): it is started by
the first that needs it, with that one's address, protocol and devices; a later one asking for
another protocol is told so rather than silently given the first one's.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from netloader.errors import ConfigError

log = logging.getLogger("netloader.transport")

INSTALL_HINT = (
    "pip install 'netloader[mooncake]' (CUDA build), or mooncake-transfer-engine-non-cuda "
    "(CPU-only hosts) / mooncake-transfer-engine-npu (Ascend)"
)


def _import_engine() -> tuple[Any, str | None]:
    """Mooncake's TransferEngine class, or None and why it cannot be imported here."""
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # not installed, or a library it needs (libibverbs) is missing
        return None, f"mooncake is not importable ({exc}); {INSTALL_HINT}"
    return TransferEngine, None


def route_address(peer_host: str) -> str:
    """This host's address on the route to ``peer_host`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class Regions:
    """Registered storages by (address, bytes), each with how many users hold it."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], int] = {}

    @staticmethod
    def of(buffers: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        """The distinct storages holding ``buffers``' bytes (empty ones left out)."""
        found: dict[tuple[int, int], None] = {}
        for buf in buffers:
            if buf.numel():
                storage = buf.untyped_storage()
                found[(storage.data_ptr(), storage.nbytes())] = None
        return list(found)


class ProcessEngine:
    """The process's TransferEngine, its segment name, and its registered memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._te: Any = None
        self._absent: str | None = None
        self._imported = False
        self.protocol = ""
        #: Where peers find this engine: "IP:RPC_PORT".
        self.segment = ""
        self.regions = Regions()
        #: What each served snapshot holds, released when it is gone.
        self._owned: weakref.WeakKeyDictionary[object, list[list[tuple[int, int]]]] = (
            weakref.WeakKeyDictionary()
        )

    def absent(self) -> str | None:
        """Why Mooncake cannot run in this process (None: it can, or it has not failed yet)."""
        with self._lock:
            if not self._imported:
                self._imported = True
                self._class, self._absent = _import_engine()
                if self._absent:
                    log.info("mooncake transport absent: %s", self._absent)
            return self._absent

    def start(self, hostname: str, protocol: str, devices: Sequence[str] | None) -> None:
        """Start the engine unless it runs; ConfigError if it runs with another protocol,
        RuntimeError (and absent from then on) if it cannot start."""
        reason = self.absent()
        if reason:
            raise RuntimeError(reason)
        with self._lock:
            if self._te is not None:
                if protocol != self.protocol:
                    raise ConfigError(
                        f"this process's Mooncake engine speaks {self.protocol!r}, "
                        f"not {protocol!r}: one protocol per process"
                    )
                return
            te = self._class()
            rc = te.initialize(hostname, "P2PHANDSHAKE", protocol, ",".join(devices or ()))
            if rc != 0:
                self._absent = f"Mooncake TransferEngine did not start ({protocol}, rc {rc})"
                log.error("%s", self._absent)
                raise RuntimeError(self._absent)
            self._te, self.protocol = te, protocol
            self.segment = f"{hostname}:{te.get_rpc_port()}"
            log.info("mooncake engine started: segment %s, protocol %s", self.segment, protocol)

    @property
    def started(self) -> bool:
        return self._te is not None

    def hold(self, buffers: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        """Register the storages of ``buffers`` (once each); the caller releases what it got,
        unless it holds them for good (a served snapshot)."""
        keys = Regions.of(buffers)
        with self._lock:
            for key in keys:
                if key not in self.regions.held:
                    rc = self._te.register_memory(*key)
                    if rc != 0:
                        raise OSError(
                            f"Mooncake cannot register {key[1]} bytes at {key[0]:#x}: rc {rc}"
                        )
                self.regions.held[key] = self.regions.held.get(key, 0) + 1
        return keys

    def hold_for(self, owner: object, buffers: Sequence[torch.Tensor]) -> None:
        """Register the storages of ``buffers`` for as long as ``owner`` lives (a served
        snapshot), replacing what it held before (its buffers may have been swapped)."""
        keys = Regions.of(buffers)
        holder = self._owned.get(owner)
        if holder is not None and holder[0] == keys:
            return
        self.hold(buffers)
        if holder is None:
            holder = self._owned[owner] = [keys]
            weakref.finalize(owner, lambda: self.release(holder[0])).atexit = False
        else:
            old, holder[0] = holder[0], keys
            self.release(old)

    def release(self, keys: Sequence[tuple[int, int]]) -> None:
        with self._lock:
            for key in keys:
                left = self.regions.held.get(key, 0) - 1
                if left > 0:
                    self.regions.held[key] = left
                    continue
                self.regions.held.pop(key, None)
                self._te.unregister_memory(key[0])

    def read(self, segment: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        """One-sided reads of ``lengths`` bytes from ``remote`` addresses of ``segment`` into
        ``local`` ones, all at once; OSError if any failed (Mooncake says no more)."""
        rc = self._te.batch_transfer_sync_read(segment, local, remote, lengths)
        if rc < 0:
            raise OSError(
                f"Mooncake read of {len(lengths)} piece(s) from {segment} failed (rc {rc})"
            )
