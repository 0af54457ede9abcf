"""A test bed of network namespaces joined by rate-limited links, for multi-host tests on one box.

Each host is a network namespace with loopback and one veth (``eth0``) plugged into a bridge
that lives in a namespace of its own, so the root namespace's interfaces and routes are never
touched and the hosts reach only each other (no default route). Each host's link is shaped with
``tc tbf`` in both directions at that host's rate, like a symmetric NIC::

    with NetBed({"seed": "1gbit", "a": "200mbit", "b": None}) as bed:
        server = bed["seed"].popen([sys.executable, "-m", "netloader", "serve", ...])
        bed["a"].run([sys.executable, "-m", "netloader", "pull", f"{bed['seed'].address}:..."])

Needs root and iproute2 (``ip``, ``tc``). Namespace names carry the owner's pid, so beds never
clash, and a new bed deletes namespaces whose owner died without cleaning up. A bed is torn down
(processes inside killed, namespaces deleted) on leaving the ``with``, on SIGINT/SIGTERM and at
interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_RATE", "Host", "NetBed", "NetBedError", "available", "parse_rate", "stream"]

DEFAULT_RATE = "1gbit"
_PREFIX = "nl"
# Bits per second per unit, as tc spells them ("bps" is bytes per second in tc).
_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
    "tbps": 8 * 10**12,
}
_RATE = re.compile(r"(\d+(?:\.\d+)?)([a-z]+)")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_OWNED = re.compile(rf"{_PREFIX}(\d+)-\d+(?:-.*)?")  # nl<owner pid>-<bed number>[-<host>]
_KILL_WAIT_S = 10.0
_counter = itertools.count()


class NetBedError(RuntimeError):
    """A command that builds or tears down a bed failed; the message names it and its stderr."""


def parse_rate(rate: str) -> int:
    """Bits per second of a tc rate string ("200mbit", "1gbit", "500kbit", "10mbps")."""
    match = _RATE.fullmatch(rate.strip().lower()) if isinstance(rate, str) else None
    bits = float(match[1]) * _UNITS[match[2]] if match and match[2] in _UNITS else 0
    if bits < 8:
        allowed = ", ".join(_UNITS)
        raise ValueError(
            f"bad rate {rate!r}: expected a positive number and a tc unit ({allowed}; bps = "
            "bytes/s), e.g. '200mbit', '1gbit', '500kbit'"
        )
    return int(bits)


def _tbf(bits_per_s: int) -> list[str]:
    """tbf parameters that let one TCP stream fill the link (measured in docs/netbed.md).

    The bucket holds 2 ms of traffic but at least two 64 KiB GSO packets: with a 16 kB bucket
    one stream reached only about half of 2 Gbit/s. The queue holds 50 ms of traffic, at least
    four buckets: one shorter than a GSO packet drops nearly everything.
    """
    per_ms = bits_per_s // 8 // 1000
    burst = max(2 * per_ms, 2 * 65536 + 4096)
    limit = max(50 * per_ms, 4 * burst)
    return ["tbf", "rate", str(bits_per_s), "burst", str(burst), "limit", str(limit)]


def _cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ip/tc command; on failure raise NetBedError with the command and its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NetBedError(
            f"`{' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _cmd("ip", "netns", "list").stdout.splitlines() if line]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside ``ns`` (repeating for any that forked meanwhile), wait for
    them to exit, then delete it. A namespace outlives its deletion while a process is in it."""
    for _ in range(100):
        pids = [int(p) for p in _cmd("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            _kill_and_wait(pid)
    proc = _cmd("ip", "netns", "del", ns, check=False)
    if proc.returncode != 0 and ns in _namespaces():
        raise NetBedError(f"`ip netns del {ns}` failed: {proc.stderr.strip()}")


def _kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` through a pidfd (no risk of hitting a reused pid) and wait for its exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], _KILL_WAIT_S)
    finally:
        os.close(fd)


def _remove_stale() -> None:
    """Delete namespaces of earlier beds whose owning process no longer exists."""
    for ns in _namespaces():
        match = _OWNED.fullmatch(ns)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            with contextlib.suppress(NetBedError):
                _kill_namespace(ns)


def available() -> tuple[bool, str]:
    """(True, "") if beds can be built here, else (False, why): root, iproute2 and a namespace
    that can really be created (containers often forbid it even to root)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    missing = [tool for tool in ("ip", "tc", "sysctl") if shutil.which(tool) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)} (iproute2, procps)"
    probe = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
    try:
        _cmd("ip", "netns", "add", probe)
        _cmd("ip", "-n", probe, "link", "set", "lo", "up")
    except NetBedError as e:
        return False, str(e)
    finally:
        with contextlib.suppress(NetBedError):
            _kill_namespace(probe)
    return True, ""


class Host:
    """One host of a bed: a network namespace with one shaped link to the bed's bridge."""

    def __init__(self, bed: NetBed, name: str, ns: str, address: str, rate: str) -> None:
        self.name = name
        self.ns = ns
        self.address = address
        self.rate = rate
        self._bed = bed

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, address={self.address!r}, rate={self.rate!r})"

    def _argv(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        if isinstance(args, str | bytes):
            raise TypeError("pass the command as a list of arguments, not a string")
        return ["ip", "netns", "exec", self.ns, *map(os.fspath, args)]

    def popen(self, args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(args, **kwargs)`` inside this host; killed at teardown if still
        running. ``ip netns exec`` execs the command, so the Popen's pid is the command's."""
        proc = subprocess.Popen(self._argv(args), **kwargs)
        self._bed._procs.append(proc)
        return proc

    def run(
        self, args: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run(args, **kwargs)`` inside this host."""
        return subprocess.run(self._argv(args), **kwargs)

    def tx_bytes(self) -> int:
        """Bytes this host has sent on its link (Ethernet frames, headers included)."""
        return self._counters()["tx"]["bytes"]

    def rx_bytes(self) -> int:
        """Bytes this host has received on its link (Ethernet frames, headers included)."""
        return self._counters()["rx"]["bytes"]

    def _counters(self) -> dict[str, Any]:
        out = _cmd("ip", "-n", self.ns, "-s", "-j", "link", "show", "dev", "eth0").stdout
        return json.loads(out)[0]["stats64"]


class NetBed:
    """Hosts in network namespaces on one bridge, each link shaped at its host's rate.

    ``hosts`` maps a host name to its rate (a tc rate string, or None for ``default_rate``).
    Addresses come from ``subnet`` (default ``10.213.N.0/24``, N different for each bed of a
    process so that one bed's addresses mean nothing in another), in the order of ``hosts``,
    starting at the second address. Everything is built in the constructor; on any failure what
    was made is torn down and NetBedError (or ValueError for bad arguments) is raised.
    """

    def __init__(
        self,
        hosts: Mapping[str, str | None],
        default_rate: str = DEFAULT_RATE,
        subnet: str | None = None,
    ) -> None:
        number = next(_counter)
        self._owner = os.getpid()
        self.name = f"{_PREFIX}{self._owner}-{number}"
        rates = _check_hosts(hosts, default_rate)
        network = ipaddress.IPv4Network(subnet or f"10.213.{number % 256}.0/24")
        addresses = list(itertools.islice(network.hosts(), 1, len(rates) + 1))
        if len(addresses) < len(rates):
            raise ValueError(f"subnet {network} is too small for {len(rates)} hosts")
        self._prefixlen = network.prefixlen
        self.hosts: dict[str, Host] = {
            name: Host(self, name, f"{self.name}-{name}", str(addr), rate)
            for (name, rate), addr in zip(rates.items(), addresses, strict=True)
        }
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        _register(self)
        try:
            _remove_stale()
            self._build()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _namespaces(self) -> list[str]:
        return [self.name, *(host.ns for host in self.hosts.values())]

    def _build(self) -> None:
        for ns in self._namespaces():
            _cmd("ip", "netns", "add", ns)
            # New interfaces get no IPv6, so links carry only the tests' traffic (no ND, MLD).
            _cmd("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
            _cmd("ip", "-n", ns, "link", "set", "lo", "up")
        _cmd("ip", "-n", self.name, "link", "add", "br0", "type", "bridge")
        _cmd("ip", "-n", self.name, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts.values()):
            self._plug(host, f"p{index}")

    def _plug(self, host: Host, port: str) -> None:
        """Join ``host`` to the bridge, shaping its uplink (eth0) and downlink (the bridge port)."""
        tbf = _tbf(parse_rate(host.rate))
        br, ns = ("ip", "-n", self.name), ("ip", "-n", host.ns)
        _cmd(*br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        _cmd(*br, "link", "set", port, "master", "br0", "up")
        _cmd(*ns, "addr", "add", f"{host.address}/{self._prefixlen}", "dev", "eth0")
        _cmd(*ns, "link", "set", "eth0", "up")
        _cmd("tc", "-n", host.ns, "qdisc", "add", "dev", "eth0", "root", *tbf)
        _cmd("tc", "-n", self.name, "qdisc", "add", "dev", port, "root", *tbf)

    def close(self) -> None:
        """Kill the processes inside the bed and delete its namespaces. Safe to call again,
        also from a signal handler that interrupted a close in progress."""
        if self._closed:
            return
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        existing = set(_namespaces())
        errors = []
        for ns in self._namespaces():
            if ns in existing:
                try:
                    _kill_namespace(ns)
                except NetBedError as e:
                    errors.append(str(e))
        self._closed = True
        _unregister(self)
        if errors:
            raise NetBedError("; ".join(errors))


def _check_hosts(hosts: Mapping[str, str | None], default_rate: str) -> dict[str, str]:
    """Host name -> rate, every name and rate checked before anything is created."""
    if not hosts:
        raise ValueError("a bed needs at least one host")
    rates = {}
    for name, rate in hosts.items():
        if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
            raise ValueError(f"bad host name {name!r}: use 1-32 of A-Z a-z 0-9 _ . -")
        rates[name] = rate if rate is not None else default_rate
        parse_rate(rates[name])
    return rates


# One TCP stream between two hosts: the receiver prints its port, then acknowledges the last byte.
_SINK = """
import socket, sys
n = int(sys.argv[2])
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
buf = bytearray(1 << 20)
while n > 0:
    got = conn.recv_into(buf, min(n, len(buf)))
    if not got:
        sys.exit(f"connection closed with {n} bytes to come")
    n -= got
conn.sendall(b"k")
"""
_SOURCE = """
import socket, sys, time
n = int(sys.argv[3])
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
chunk = memoryview(bytes(1 << 20))
start = time.perf_counter()
while n > 0:
    n -= conn.send(chunk[: min(n, len(chunk))])
if conn.recv(1) != b"k":
    sys.exit("no acknowledgement")
print(time.perf_counter() - start)
"""


def stream(src: Host, dst: Host, nbytes: int, timeout: float = 120.0) -> float:
    """Seconds for one Python TCP stream to move ``nbytes`` from ``src`` to ``dst``: from the
    connection being up to the receiver acknowledging the last byte."""
    sink = dst.popen(
        [sys.executable, "-c", _SINK, dst.address, str(nbytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = sink.stdout.readline().strip()
        source = src.run(
            [sys.executable, "-c", _SOURCE, dst.address, port, str(nbytes)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if source.returncode != 0 or sink.wait(timeout) != 0:
            raise NetBedError(f"stream {src.name} -> {dst.name} failed: {source.stderr.strip()}")
        return float(source.stdout)
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait()
        sink.stdout.close()


# Teardown on interpreter exit and on SIGINT/SIGTERM, for every bed this process has open.
_live: list[NetBed] = []
_lock = threading.RLock()
_previous: dict[int, Any] = {}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _register(bed: NetBed) -> None:
    with _lock:
        _live.append(bed)
        if not _previous and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored
                    _previous[signum] = signal.signal(signum, _on_signal)


def _unregister(bed: NetBed) -> None:
    with _lock:
        if bed in _live:
            _live.remove(bed)
        if not _live and threading.current_thread() is threading.main_thread():
            _restore_handlers()


def _restore_handlers() -> None:
    """Put back the handlers that were there before the first bed, unless replaced since."""
    for signum, previous in list(_previous.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        del _previous[signum]


def _close_all() -> None:
    """Close every bed of this process (not of a parent that forked it)."""
    for bed in list(_live):
        if bed._owner == os.getpid():
            try:
                bed.close()
            except Exception as e:  # keep closing the others
                print(f"netbed: teardown of {bed.name} failed: {e}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Tear down, then let the signal do what it would have done without us."""
    previous = _previous.get(signum, signal.SIG_DFL)
    _close_all()
    with _lock:
        _restore_handlers()
    if callable(previous):
        previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
    elif previous in (signal.SIG_DFL, None):  # None: set outside Python, assume the default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


atexit.register(_close_all)
