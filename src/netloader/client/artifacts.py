"""Fetching a compile-cache entry from a source and installing it (``netloader.artifacts``).

A fetch never raises: it returns what happened, for one log line. Nothing is fetched when
ARTIFACTS is off, when there is no token (unless a trusted network is declared), or when the
entry exists locally; a source whose entry differs ships nothing and says which factor
differed. Any failure (refusal, hostile offer, digest mismatch, lost connection) leaves
nothing on disk and is reported as failed: the caller compiles as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from netloader.artifacts.entry import Wanted
from netloader.artifacts.install import EntryExists, Unfit, check_offer, install
from netloader.artifacts.wire import ArtifactsRequest
from netloader.client.control import Control, Endpoint
from netloader.errors import NetloaderError, ProtocolError
from netloader.options import ArtifactOptions, Timeouts
from netloader.protocol import PROTOCOL_VERSION

log = logging.getLogger("netloader.client")

NO_TOKEN = (
    "no token: compile artifacts are native code and travel only between peers that proved a "
    "shared token (set TOKEN_FILE or NETLOADER_TOKEN on both, or ARTIFACTS=trusted-network on "
    "a trusted network)"
)


@dataclass(frozen=True)
class Fetched:
    """What one fetch did: from ``source``, ``files`` files of ``nbytes`` in ``seconds``; or
    nothing, and ``reason`` why (``failed``: something went wrong, not a mere mismatch)."""

    source: str = ""
    files: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    failed: bool = False

    def describe(self) -> str:
        if self.files:
            return (
                f"from peer {self.source}: {self.files} files, {self.nbytes / 1e6:.1f} MB "
                f"in {self.seconds:.2f} s"
            )
        where = f" from peer {self.source}" if self.source else ""
        return f"none{where}: {self.reason}"


def fetch_artifacts(
    sources: Sequence[str],
    wanted: Wanted,
    options: ArtifactOptions,
    token: bytes | None,
    timeouts: Timeouts | None = None,
) -> Fetched:
    """Install ``wanted`` from the first of ``sources`` that offers it (see the module)."""
    if options.mode == "off":
        return Fetched(reason="ARTIFACTS is off")
    if token is None and options.mode == "token":
        return Fetched(reason=NO_TOKEN)
    local = wanted.local()
    if local is not None:
        return Fetched(reason=f"a local cache entry exists ({local.directory})")
    first: Fetched | None = None
    for source in sources:
        fetched = _fetch_one(source, wanted, options, token, timeouts or Timeouts())
        if fetched.files or fetched.failed:
            return fetched
        first = first or fetched
    return first or Fetched(reason="no source")


def _fetch_one(
    source: str, wanted: Wanted, options: ArtifactOptions, token: bytes | None, timeouts: Timeouts
) -> Fetched:
    start = time.perf_counter()
    request = ArtifactsRequest(PROTOCOL_VERSION, wanted.kind.name, wanted.alias, wanted.factors, "")
    try:
        with Control.open(Endpoint.parse(source), timeouts, token) as control:
            offer = control.ask_artifacts(request)
            if not offer.files:
                return Fetched(source, reason=offer.reason)
            total = check_offer(offer.files, options.max_files, options.max_bytes)
            channel = control.channel
            install(wanted, offer.key, offer.files, read=lambda n: channel.recv_exact(n))
    except EntryExists as exc:
        return Fetched(source, reason=f"a local cache entry exists ({exc})")
    except (Unfit, NetloaderError, ProtocolError, OSError, ValueError) as exc:
        return Fetched(source, reason=f"{type(exc).__name__}: {exc}", failed=True)
    seconds = time.perf_counter() - start
    return Fetched(source, len(offer.files), total, seconds)
