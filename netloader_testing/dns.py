"""A real DNS server for one host of a NetBed: dnsmasq answering fixed records, and that host's
resolver pointed at it.

    with NetBed({...}) as bed, NameServer(bed["client"], {"seeds.test": [a, b, c]}):
        bed["client"].run([... "netloader", "pull", "seeds.test:9100"])

dnsmasq runs inside the host's namespace, on its loopback, with no upstream and no hosts file;
``ip netns exec`` bind-mounts ``/etc/netns/<namespace>/resolv.conf`` over ``/etc/resolv.conf``
for every command it starts there, so the file written here points only that host's processes
at it. Both are removed on leaving the ``with`` (the dnsmasq process is also one of the bed's,
killed at the bed's teardown).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from netloader_testing.netbed import Host, NetBedError

__all__ = ["NameServer"]

NETNS_ETC = Path("/etc/netns")

# Resolves argv[1] until it gives argv[2] addresses (or the deadline passes): dnsmasq is ready.
_WAIT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        got = {a[4][0] for a in socket.getaddrinfo(sys.argv[1], 1, type=socket.SOCK_STREAM)}
        if len(got) >= int(sys.argv[2]):
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{sys.argv[1]} did not resolve to {sys.argv[2]} addresses within 10 s")
    time.sleep(0.05)
"""


class NameServer:
    """dnsmasq in ``host``'s namespace answering ``records`` (name -> its IPv4 addresses, one A
    record each), and ``host``'s resolver pointed at it."""

    def __init__(self, host: Host, records: Mapping[str, Sequence[str]]):
        self.host = host
        self.records = {name: list(addresses) for name, addresses in records.items()}
        self.folder = NETNS_ETC / host.ns
        self._made_etc = False
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> NameServer:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._made_etc = not NETNS_ETC.exists()
        self.folder.mkdir(parents=True, exist_ok=False)
        (self.folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        entries = [
            f"--host-record={name},{address}"
            for name, addresses in self.records.items()
            for address in addresses
        ]
        self._proc = self.host.popen(
            [
                *("dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root"),
                *("--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file="),
                *("--log-facility=/dev/null", *entries),
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, addresses in self.records.items():
            waited = self.host.run(
                [sys.executable, "-c", _WAIT, name, str(len(addresses))],
                capture_output=True,
                text=True,
            )
            if waited.returncode != 0:
                raise NetBedError(f"dnsmasq in {self.host.ns}: {waited.stderr.strip()}")

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
            self._proc.wait()
            self._proc.stderr.close()  # type: ignore[union-attr]
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "resolv.conf").unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.folder.rmdir()
        if self._made_etc:
            with contextlib.suppress(OSError):  # another bed's folder may be there now
                NETNS_ETC.rmdir()
