"""Sources given by DNS name: one source per address, resolved when the pull starts.

A Kubernetes headless Service (or any name with several A/AAAA records) names every instance
that serves; each of its addresses becomes a source of its own, and they stripe like any list
of sources. A name's addresses come in random order (none is preferred over another, and a
fleet of clients then spreads its first requests); the list's order between the names and
addresses given stays. A client never counts its own server's address as a source.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from collections.abc import Sequence

from netloader.client.control import Endpoint
from netloader.sockets import is_local

log = logging.getLogger("netloader.client")


def resolve(endpoints: Sequence[Endpoint], own: Endpoint | None = None) -> list[Endpoint]:
    """``endpoints`` with every name replaced by one endpoint per address it resolves to
    (a name that does not resolve stays as given: it fails as unreachable, in its place),
    without duplicates and without ``own`` (this client's own server)."""
    out: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    for endpoint in endpoints:
        for candidate in _addresses(endpoint):
            key = (candidate.host, candidate.port)
            if key in seen or _is_own(candidate, own):
                continue
            seen.add(key)
            out.append(candidate)
    return out


def _addresses(endpoint: Endpoint) -> list[Endpoint]:
    if _is_literal(endpoint.host):
        return [endpoint]
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("source %s: cannot resolve %r: %s", endpoint.text, endpoint.host, exc)
        return [endpoint]
    hosts = list(dict.fromkeys(str(info[4][0]) for info in infos))
    random.shuffle(hosts)
    found = [Endpoint(_text(host, endpoint.port), host, endpoint.port) for host in hosts]
    log.info("source %s: %s", endpoint.text, ", ".join(e.text for e in found))
    return found


def _is_own(candidate: Endpoint, own: Endpoint | None) -> bool:
    """Whether ``candidate`` is this client's own server: its port, and an address of this
    machine (the server may listen on every address)."""
    if own is None or candidate.port != own.port:
        return False
    return candidate.host == own.host or is_local(candidate.host)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
