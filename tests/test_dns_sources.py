"""Sources found by DNS name, and behind a balancing address, between hosts of a NetBed.

A real DNS server (dnsmasq, in the client's namespace) answers a name with one A record per
seed; a balancing address is made as kube-proxy makes a ClusterIP Service: iptables' ``statistic``
match picks a seed for every new connection (DNAT in the client's namespace). Skipped where
namespaces cannot be made or dnsmasq/iptables are missing.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import all_cases, assert_same, in_process_server
from netbed_fixtures import require_netbed, require_tool
from safetensors.torch import load_file, save_file

from netloader import ConfigError, Identity, Server, pull
from netloader.client import parse_source
from netloader.client.control import Endpoint
from netloader.client.names import resolve
from netloader.sockets import free_port
from netloader.synthetic import llm_like
from netloader_testing import dns
from netloader_testing.netbed import NetBed

PORT = 9100
NAME = "seeds.test"
NETLOADER = [sys.executable, "-m", "netloader"]
SHARE = re.compile(r"(\S+:\d+) \((\d+) bytes\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require_netbed()
    require_tool("dnsmasq", "dnsmasq-base")
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    folder.mkdir()
    tensors = llm_like(24 << 20, seed=5)
    save_file(tensors, folder / "model.safetensors")
    return folder, tensors


def serve(host, folder, *extra: str) -> subprocess.Popen:
    """``netloader serve`` on ``host`` at PORT, once it listens."""
    proc = host.popen(
        [*NETLOADER, "serve", folder, "--host", host.address, "--listen-port", str(PORT), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc


def cli_pull(host, sources: list[str], out, *extra: str) -> subprocess.CompletedProcess:
    return host.run(
        [*NETLOADER, "pull", *sources, "--out", out, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def balance(host, vip: str, backends: list[str]) -> None:
    """New connections from ``host`` to ``vip:PORT`` go to one of ``backends`` at random, each
    equally likely, as kube-proxy's iptables rules do for a Service."""
    for i, backend in enumerate(backends):
        left = len(backends) - i
        match = ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"]
        rule = ["-t", "nat", "-A", "OUTPUT", "-d", vip, "-p", "tcp", "--dport", str(PORT)]
        target = ["-j", "DNAT", "--to-destination", f"{backend}:{PORT}"]
        host.run(["iptables", *rule, *(match if left > 1 else []), *target], check=True)


SEEDS = {"a": "100mbit", "b": "100mbit", "c": "100mbit", "client": "1gbit"}


def test_a_name_with_three_addresses_stripes_over_all_three(checkpoint, tmp_path):
    """Three seeds behind one name (3 A records): the pull takes chunks from each of them, and
    every connection of one source reached the seed that accepted (the pull is bit-exact). A
    name that does not resolve costs only itself."""
    folder, tensors = checkpoint
    with NetBed(SEEDS) as bed:
        addresses = [bed[name].address for name in "abc"]
        for name in "abc":
            serve(bed[name], folder)
        with dns.NameServer(bed["client"], {NAME: addresses}):
            # A name the server does not know fails as unreachable, in its place.
            names = [f"missing.test:{PORT}", f"{NAME}:{PORT}"]
            proc = cli_pull(bed["client"], names, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    shares = dict(SHARE.findall(proc.stdout))
    assert set(shares) == {f"{a}:{PORT}" for a in addresses}, proc.stdout
    assert all(int(n) > 0 for n in shares.values()), proc.stdout
    assert_same(tensors, load_file(tmp_path / "out" / "model.safetensors"))


def test_every_connection_of_a_source_reaches_the_seed_that_accepted_behind_a_balancer(
    checkpoint, tmp_path
):
    """A balancing address that sends each new connection to a random seed: the data
    connections follow the Accept to the seed that accepted, and the pull is bit-exact."""
    require_tool("iptables", "iptables")
    folder, tensors = checkpoint
    with NetBed(SEEDS) as bed:
        for name in "abc":
            serve(bed[name], folder)
        vip = str(bed["client"].address).rsplit(".", 1)[0] + ".200"
        balance(bed["client"], vip, [bed[name].address for name in "abc"])
        proc = cli_pull(bed["client"], [f"{vip}:{PORT}"], tmp_path / "out", "--streams", "8")
    assert proc.returncode == 0, proc.stderr
    assert_same(tensors, load_file(tmp_path / "out" / "model.safetensors"))


# --- without a bed: names on loopback ---------------------------------------------------


def test_a_name_is_one_source_per_address_never_the_clients_own_server():
    """``localhost`` (127.0.0.1 in /etc/hosts) becomes its address; the client's own server's
    address, given literally or by name, is not a source; literal addresses stay as given."""
    port = free_port()
    assert [e.text for e in resolve([Endpoint.parse(f"localhost:{port}")])] == [f"127.0.0.1:{port}"]
    own = Endpoint.parse(f"127.0.0.1:{port}")
    given = [Endpoint.parse(f"localhost:{port}"), own, Endpoint.parse(f"127.0.0.1:{port + 1}")]
    assert [e.text for e in resolve(given, own)] == [f"127.0.0.1:{port + 1}"]


def test_a_relay_pulling_from_a_name_that_includes_itself_takes_only_from_the_others():
    """A replica whose name resolves to its own address too (as a headless Service's may):
    it pulls from the seed alone, never from itself; a name that gives only its own address
    leaves no source, and says so."""
    ident = Identity("test-model")
    with in_process_server(all_cases(), host="127.0.0.1") as seed:
        _, port = parse_source(seed.address)
        with Server(None, ident, host="127.0.0.1").start() as replica:
            _, own = parse_source(replica.address)
            with pytest.raises(ConfigError, match="only this client's own server"):
                pull([f"localhost:{own}"], ident, relay=replica, handshake_timeout=2)
        with Server(None, ident, host="127.0.0.1").start() as replica:
            _, own = parse_source(replica.address)
            result = pull([f"localhost:{own}", f"localhost:{port}"], ident, relay=replica)
    assert list(result.sources) == [seed.address]
