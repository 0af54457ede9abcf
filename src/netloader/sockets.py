"""Socket helpers shared by the server, the client and the TCP transport."""

from __future__ import annotations

import contextlib
import socket
import struct


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A connected, tuned TCP socket (raises OSError when the peer cannot be reached)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    tune(sock)
    return sock


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking mode with SO_RCVTIMEO/SO_SNDTIMEO, so the kernel enforces the idle bound.

    Python's own socket timeouts poll before every call and force a Python-level loop on
    every partial read or write; kernel timeouts let ``sendall`` and ``MSG_WAITALL`` reads
    loop inside C. A wait that exceeds the bound fails with EAGAIN (BlockingIOError).
    """
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def keepalive(sock: socket.socket, idle: float) -> None:
    """TCP keepalive probes after ``idle`` seconds of silence, every ``idle / 3`` seconds, three
    times: a connection to a host that vanished fails within about twice ``idle``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(idle / 3)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def shutdown(sock: socket.socket) -> None:
    """Shut a socket down both ways, waking any thread blocked on it; errors ignored."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def close(sock: socket.socket) -> None:
    shutdown(sock)
    sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound, then released): for tests and benchmarks."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def advertised(host: str) -> str:
    """The address peers should dial: the bound one, or this host's name for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def split_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port): the one parser of addresses.
    ValueError unless the host is non-empty and the port in 1..65535."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} is not 'host:port' with a port in 1..65535")
    return host, int(port)


def local_address(sock: socket.socket) -> str:
    """``host:port`` (``[v6]:port``) this connection reached on this machine: behind a name or
    a balancing address (DNAT), the address of this very server."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_name(peer: object) -> str:
    """``host:port`` of an accepted connection's peer address."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def is_local(host: str) -> bool:
    """Whether ``host`` (a name or an address) is an address of this machine, as seen from this
    network namespace: binding a socket to it succeeds. Loopback counts; an unresolvable name
    does not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, kind, _, _, address in infos:
        try:
            with socket.socket(family, kind) as s:
                s.bind((address[0], 0, *address[2:]))
            return True
        except OSError:
            continue
    return False
