"""The network-namespace test bed: real namespaces, real links, real processes.

Beds need root and iproute2; these tests skip without them (or fail under
NETLOADER_REQUIRE_NETNS=1). Shaping is checked only from below: a shaped link cannot be faster
than its rate, while how close to the rate it gets depends on the machine.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from netbed_fixtures import require_netbed

import netloader_testing.netbed as netbed
from netloader_testing.netbed import NetBed, NetBedError, parse_rate, stream

SRC = str(Path(netbed.__file__).parents[1])  # the root holding netloader_testing

# Accepts one connection on (argv[1], any port), after printing the port.
SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
server.accept()
"""
# Connects to each host:port argument; prints "connected" or the error's errno name.
PROBE = """
import errno, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, repr(e)))
"""
# Builds a bed with a process inside, says "ready <bed name> <pid inside>", then waits. With
# argument "default", SIGINT kills it outright (no KeyboardInterrupt to unwind the `with`).
CHILD = """
import signal, sys
from netloader_testing.netbed import NetBed
# "python": Python's own handler, set here since a parent that ignores SIGINT (a shell's
# background job does) passes that on and Python then installs none; "default": SIG_DFL.
python = sys.argv[1:] == ["python"]
signal.signal(signal.SIGINT, signal.default_int_handler if python else signal.SIG_DFL)
with NetBed({"a": None, "b": "100mbit"}) as bed:
    inside = bed["a"].popen(["sleep", "600"])
    print("ready", bed.name, inside.pid, flush=True)
    signal.pause()
"""


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line}


def of_bed(name: str) -> set[str]:
    return {ns for ns in namespaces() if ns == name or ns.startswith(f"{name}-")}


def root_network() -> list[str]:
    """The root namespace's interfaces, addresses and routes."""
    cmds = [["ip", "-br", "link"], ["ip", "-br", "addr"], ["ip", "route"], ["ip", "-6", "route"]]
    return [subprocess.run(c, capture_output=True, text=True, check=True).stdout for c in cmds]


def start_server(host: netbed.Host) -> tuple[subprocess.Popen[str], str]:
    proc = host.popen(
        [sys.executable, "-c", SERVER, host.address], stdout=subprocess.PIPE, text=True
    )
    return proc, f"{host.address}:{proc.stdout.readline().strip()}"


def ready_shell(argv_prefix: list[str]) -> subprocess.Popen[str]:
    """A shell that says "ready" and then sleeps, started through ``argv_prefix``."""
    proc = subprocess.Popen(
        [*argv_prefix, "sh", "-c", "echo ready; exec sleep 600"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_rates_in_tc_syntax() -> None:
    assert parse_rate("200mbit") == 200_000_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("1.5Gbit") == 1_500_000_000
    assert parse_rate("10mbps") == 80_000_000  # tc's bps is bytes per second
    for bad in ["", "fast", "200", "200mb", "200 mbit", "-5mbit", "0mbit", "1bit"]:
        with pytest.raises(ValueError, match="bad rate"):
            parse_rate(bad)


def test_bad_rate_is_refused_before_anything_is_created(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no PATH, any ip/tc command would raise FileNotFoundError instead of the ValueError.
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ValueError, match=r"bad rate 'fast'.*mbit.*gbit"):
        NetBed({"a": None, "b": "fast"})
    with pytest.raises(ValueError, match=r"bad rate '1 gigabit'"):
        NetBed({"a": None}, default_rate="1 gigabit")
    with pytest.raises(ValueError, match="bad host name"):
        NetBed({"a/b": None})


def test_require_netbed_skips_or_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")  # no ip or tc: beds are unavailable
    monkeypatch.delenv("NETLOADER_REQUIRE_NETNS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"missing tools|root"):
        require_netbed()
    monkeypatch.setenv("NETLOADER_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match=r"missing tools|root"):
        require_netbed()


def test_hosts_reach_each_other_and_nothing_else() -> None:
    require_netbed()
    root = socket.create_server(("127.0.0.1", 0))  # listening on the root namespace's loopback
    with root, NetBed({"a": None, "b": "100mbit"}) as bed, NetBed({"x": None}) as other:
        _, on_b = start_server(bed["b"])
        _, on_other = start_server(other["x"])  # listening, but in another bed
        targets = [on_b, on_other, f"127.0.0.1:{root.getsockname()[1]}", "198.51.100.1:80"]
        probe = bed["a"].run(
            [sys.executable, "-c", PROBE, *targets], capture_output=True, text=True, check=True
        )
        # 127.0.0.1 is the host's own loopback; the rest of the world has no route at all.
        assert probe.stdout.split() == ["connected", "ENETUNREACH", "ECONNREFUSED", "ENETUNREACH"]
        assert stream(bed["b"], bed["a"], 100_000) > 0  # and the other way round


def test_root_namespace_is_untouched() -> None:
    require_netbed()
    before = root_network()
    with NetBed({"a": None, "b": "50mbit"}) as bed:
        assert len(of_bed(bed.name)) == 3  # the bridge's namespace and one per host
        assert root_network() == before


@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_slow_host_is_shaped_both_ways(direction: str) -> None:
    require_netbed()
    nbytes, rate = 4_000_000, 40_000_000
    with NetBed({"slow": "40mbit", "fast": "2gbit"}) as bed:
        src, dst = ("slow", "fast") if direction == "uplink" else ("fast", "slow")
        seconds = stream(bed[src], bed[dst], nbytes, timeout=60)
    assert seconds >= 0.85 * nbytes * 8 / rate


def test_counters_count_the_bytes_moved() -> None:
    require_netbed()
    nbytes = 3_000_000
    with NetBed({"a": None, "b": None}) as bed:
        a, b = bed["a"], bed["b"]
        before = a.tx_bytes(), b.rx_bytes(), a.rx_bytes()
        stream(a, b, nbytes)
        sent, received, acks = a.tx_bytes() - before[0], b.rx_bytes() - before[1], a.rx_bytes()
    assert nbytes < sent < nbytes * 1.1  # TCP/IP and Ethernet headers: about 5 %
    assert nbytes < received < nbytes * 1.1
    assert acks - before[2] < nbytes * 0.1


def test_normal_exit_removes_namespaces_and_restores_signal_handlers() -> None:
    require_netbed()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with NetBed({"a": None}) as bed:
        assert of_bed(bed.name)
        assert signal.getsignal(signal.SIGTERM) not in handlers
    assert not of_bed(bed.name)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_exception_inside_removes_namespaces() -> None:
    require_netbed()
    with pytest.raises(RuntimeError, match="boom"), NetBed({"a": None, "b": None}) as bed:
        name = bed.name
        assert of_bed(name)
        raise RuntimeError("boom")
    assert not of_bed(name)


def test_failed_setup_tears_down_and_names_the_command() -> None:
    require_netbed()
    mine = f"nl{os.getpid()}-"
    before = {ns for ns in namespaces() if ns.startswith(mine)}
    # tc refuses a 50 ms queue at 5 Tbit/s (over 32 bits), after the bridge and host a exist.
    with pytest.raises(NetBedError, match=r"`tc -n nl\S+-b qdisc add dev eth0 .*illegal value"):
        NetBed({"a": None, "b": "5tbit"})
    assert {ns for ns in namespaces() if ns.startswith(mine)} == before


def test_teardown_kills_processes_inside() -> None:
    require_netbed()
    with NetBed({"a": None}) as bed:
        tracked = bed["a"].popen(["sleep", "600"])
        stray = ready_shell(["ip", "netns", "exec", bed["a"].ns])  # not started by the bed
    assert tracked.returncode == -signal.SIGKILL
    assert stray.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize(
    ("signum", "mode"),
    [(signal.SIGINT, "python"), (signal.SIGINT, "default"), (signal.SIGTERM, "default")],
)
def test_signal_tears_down_then_acts_as_usual(signum: int, mode: str) -> None:
    require_netbed()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        word, name, pid = child.stdout.readline().decode().split()
        assert word == "ready" and len(of_bed(name)) == 3
        inside = os.pidfd_open(int(pid))
        child.send_signal(signum)
        # As without a bed: KeyboardInterrupt (which ends Python by SIGINT), or death by the signal.
        assert child.wait(timeout=30) == -signum, child.stderr.read().decode()
    finally:
        child.kill()
        child.wait()
    assert not of_bed(name)
    assert select.select([inside], [], [], 0)[0] == [inside]  # the process inside has exited
    os.close(inside)


def test_previous_signal_handler_still_runs() -> None:
    require_netbed()
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with NetBed({"a": None}) as bed:
            signal.raise_signal(signal.SIGTERM)
            assert not of_bed(bed.name)  # torn down by the signal, still inside the `with`
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stale_namespaces_of_dead_owners_are_removed() -> None:
    require_netbed()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, alive = f"nl{gone.pid}-0-a", f"nl{os.getppid()}-999999-a"
    for ns in (stale, alive):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    stray = ready_shell(["ip", "netns", "exec", stale])
    try:
        with NetBed({"a": None}):
            assert stale not in namespaces()
            assert alive in namespaces()  # its owner still runs
        assert stray.wait(timeout=10) == -signal.SIGKILL
    finally:
        stray.kill()
        stray.wait()
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
