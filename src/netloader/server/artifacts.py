"""A server's compile artifacts: the cache roots it offers, and the answer to one request.

The offer reflects what is on disk when a client asks: an entry still being compiled (its
kind says when one is complete) is not offered yet, and digests are computed then (and kept
per file version, so many replicas cost one hashing). By default artifacts are offered only
when this server has a token, so that only a peer that proved it gets them; ``ARTIFACTS``
may allow a trusted network without one, or turn them off.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from netloader.artifacts.entry import (
    CacheRoot,
    Digests,
    Entry,
    EntryError,
    FileDigest,
    describe_difference,
    list_files,
)
from netloader.artifacts.kinds import Kind
from netloader.artifacts.wire import ArtifactsOffer, ArtifactsRequest
from netloader.options import ArtifactOptions
from netloader.server.handshake import Gate
from netloader.server.session import Conversation

log = logging.getLogger("netloader.server")


class Provider(Protocol):
    """Where a server finds entries of one ``kind``: by the alias a client asks for, and all
    of them (to explain a miss). ``CacheRoot`` is one; a vLLM worker adds its own."""

    kind: Kind

    def find(self, alias: str) -> Entry | None: ...

    def entries(self) -> list[Entry]: ...


class Shelf:
    """The providers of this server's compile artifacts, and its policy for offering them."""

    def __init__(self, options: ArtifactOptions, has_token: bool):
        self.options = options
        self.has_token = has_token
        self._lock = threading.Lock()
        self._providers: list[Provider] = []
        self.digests = Digests()
        if options.mode == "trusted-network" and not has_token:
            log.warning(
                "compile artifacts (native code) are offered without a token "
                "(ARTIFACTS=trusted-network): anyone who reaches this port can take them"
            )

    def add(self, provider: Provider) -> None:
        with self._lock:
            self._providers.append(provider)

    def add_root(self, kind: Kind, root: str | os.PathLike[str]) -> None:
        """Offer ``kind``'s entries (those with a sidecar) under the cache ``root``."""
        self.add(CacheRoot(kind, Path(root)))

    def providers(self, kind: str) -> list[Provider]:
        with self._lock:
            return [p for p in self._providers if p.kind.name == kind]

    def offer(self, request: ArtifactsRequest) -> tuple[ArtifactsOffer, Path | None]:
        """The files of the entry ``request`` asks for and its directory, or why none."""
        refusal = self._policy()
        if refusal:
            return ArtifactsOffer(reason=refusal), None
        providers = self.providers(request.artifact)
        if not providers:
            return ArtifactsOffer(
                reason=f"this server offers no {request.artifact!r} artifacts"
            ), None
        for provider in providers:
            entry = provider.find(request.key)
            if entry is not None:
                return self._entry_offer(entry, request.factors), entry.directory
        return ArtifactsOffer(reason=_nearest(providers, request.factors)), None

    def _policy(self) -> str:
        mode = self.options.mode
        if mode == "off":
            return "this server offers no compile artifacts (ARTIFACTS is off)"
        if mode == "token" and not self.has_token:
            return (
                "this server has no token, and compile artifacts (native code) travel only "
                "between peers that proved one (TOKEN_FILE, or ARTIFACTS=trusted-network)"
            )
        return ""

    def _entry_offer(self, entry: Entry, factors: dict[str, str]) -> ArtifactsOffer:
        differs = describe_difference(factors, entry.factors)
        if differs:
            return ArtifactsOffer(reason=f"the entry was built for another host: {differs}")
        if not entry.ready():
            return ArtifactsOffer(reason="the entry is not complete yet (still compiling)")
        try:
            names = list_files(entry.directory, self.options.max_files)
            files = []
            for name in names:
                size, sha256 = self.digests.of(entry.directory / name)
                files.append(FileDigest(name, size, sha256))
        except (EntryError, OSError) as exc:
            return ArtifactsOffer(reason=f"the entry cannot be offered: {exc}")
        if sum(f.size for f in files) > self.options.max_bytes:
            return ArtifactsOffer(reason="the entry is larger than ARTIFACTS_MAX_BYTES")
        return ArtifactsOffer(files, key=entry.key)


def _nearest(providers: list[Provider], factors: dict[str, str]) -> str:
    """Why no entry matches: the first difference from the nearest entry this server has."""
    best: tuple[int, str] | None = None
    for entry in (e for p in providers for e in p.entries()):
        differing = sum(factors.get(k) != v for k, v in entry.factors.items())
        if best is None or differing < best[0]:
            best = (differing, describe_difference(factors, entry.factors) or "its key")
    if best is None:
        return "this server has no entry of that kind yet"
    return f"no entry for this key; the nearest differs in {best[1]}"


def answer(conv: Conversation, request: ArtifactsRequest, shelf: Shelf, gate: Gate) -> None:
    """Check the token, offer what ``shelf`` has for ``request``, then send the files."""
    gate.authenticate(conv.hello, request)
    offer, directory = shelf.offer(request)
    offer.mac = gate.proof("artifacts", request.nonce, conv.hello.nonce, offer.digest())
    conv.channel.send(offer, conv.deadline)
    if not offer.files or directory is None:
        log.info("no compile artifacts for %s: %s", conv.peer, offer.reason)
        return
    sock = conv.channel.sock
    sock.settimeout(conv.channel.idle)
    for f in (f for f in offer.files if f.size):  # sendfile refuses a count of 0
        with open(directory / f.path, "rb") as src:
            if sock.sendfile(src, 0, f.size) != f.size:
                raise OSError(f"{f.path} shrank while it was sent")
    total = sum(f.size for f in offer.files) / 1e6
    log.info("sent %d compile artifact files (%.1f MB) to %s", len(offer.files), total, conv.peer)
