"""The ``mooncake`` transport with the real Mooncake TransferEngine (CPU build, TCP protocol):
in this process over 127.0.0.1 where a server's memory or its registry is touched, and between
network-namespace hosts where a source must run elsewhere or die.

Skipped where Mooncake cannot be imported (``make test`` installs the CPU build)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import all_cases, assert_same, big_cases, in_process_server, wait_for
from netbed_fixtures import SHARE, bed_checkpoint
from safetensors.torch import load_file

from netloader import Identity, IntegrityError, Refused, Server, events, pull
from netloader.mooncake_options import MooncakeOptions
from netloader.options import ServeOptions
from netloader.transport import engine
from netloader.transport.mooncake import WINDOW
from netloader_testing.netbed import NetBed

IDENT = Identity("test-model")
TOKEN = b"mooncake-test-shared-secret-01"
ON = ServeOptions(mooncake=MooncakeOptions(offer="on"))
ABSENT = engine("mooncake").absent()

pytestmark = pytest.mark.skipif(ABSENT is not None, reason=f"mooncake absent: {ABSENT}")


def test_a_token_server_offers_mooncake_and_the_pull_is_bit_exact():
    """Bit-exact, and the server still knows when and how the transfer ended: the bytes it
    let the client read, and the client's verdict."""
    ended: list = []
    unsubscribe = events.subscribe(
        lambda e: ended.append(e) if isinstance(e, events.TransferDone) else None
    )
    try:
        options = ServeOptions(token=TOKEN, chunk_size=64 << 10, mooncake=ON.mooncake)
        with Server(all_cases(), IDENT, options=options).start() as server:
            result = pull(server.address, IDENT, token=TOKEN)
            wait_for(lambda: ended, 10, "the server's end of the transfer")
    finally:
        unsubscribe()
    assert result.transport == "mooncake"
    assert_same(all_cases(), result.tensors)
    assert [(e.transport, e.ok, e.nbytes) for e in ended] == [
        ("mooncake", True, result.total_bytes)
    ]


def test_auto_offers_mooncake_only_with_a_token_over_rdma():
    """Over Mooncake's tcp protocol netloader's own TCP is faster: auto leaves mooncake off
    there, even with a token; on offers it."""
    with in_process_server(all_cases(), token=TOKEN) as server:  # auto, tcp protocol
        assert pull(server.address, IDENT, token=TOKEN).transport == "tcp"
    mooncake, rdma = engine("mooncake"), MooncakeOptions(protocol="rdma")
    assert mooncake.enabled(ServeOptions(token=TOKEN, mooncake=rdma))
    assert not mooncake.enabled(ServeOptions(mooncake=rdma))  # no token
    assert not mooncake.enabled(ServeOptions(token=TOKEN))  # the tcp protocol


def test_a_client_without_the_token_never_gets_an_offer():
    """The offer (segment, addresses) is in the Accept, which only a client that proved the
    token gets; and without a token a server offers no mooncake at all (``auto``)."""
    with in_process_server(all_cases(), token=TOKEN) as server:
        accepts: list = []
        with pytest.raises(Refused) as refused:
            pull(server.address, IDENT, transports=["mooncake"], on_accept=accepts.append)
        assert refused.value.code == "auth" and not accepts
    with in_process_server(all_cases()) as open_server:
        with pytest.raises(Refused) as refused:
            pull(open_server.address, IDENT, transports=["mooncake"])
        assert refused.value.code == "transport"
        assert pull(open_server.address, IDENT).transport == "tcp"  # proposed, not offered


def test_a_server_with_mooncake_off_falls_back_to_tcp():
    with in_process_server(all_cases(), token=TOKEN, mooncake=MooncakeOptions(offer="off")) as s:
        result = pull(s.address, IDENT, token=TOKEN, transports=["mooncake", "tcp"])
    assert result.transport == "tcp"
    assert_same(all_cases(), result.tensors)


def test_flipped_bytes_in_a_served_buffer_are_caught_and_refetched_from_another_source():
    """One source's served memory changes after capture: the client's check fails on the
    chunk it read, the chunk comes from the other source, and the result is bit-exact."""
    bad = big_cases()
    with (
        Server(bad, IDENT, options=ON).start() as flipped,
        Server(big_cases(), IDENT, options=ON).start() as good,
    ):
        bad["w0"][100] ^= 0x01  # served from this memory: the digest was taken before
        for k in range(1, 16):
            bad[f"w{k}"][0] ^= 0x01
        result = pull([flipped.address, good.address], IDENT, transports=["mooncake"])
        assert result.transport == "mooncake" and result.refetched > 0
        assert set(result.sources) == {flipped.address, good.address}
        assert_same(big_cases(), result.tensors)
        with pytest.raises(Refused) as refused:  # it re-checked itself and stopped serving
            pull(flipped.address, IDENT, transports=["mooncake"])
        assert refused.value.code == "unavailable"


def test_changed_tensors_stop_the_reads_when_the_server_verifies_before_granting():
    tensors = all_cases()
    with in_process_server(
        tensors, options=ServeOptions(verify_before_send=True, mooncake=ON.mooncake)
    ) as server:
        tensors["big"][2, 1000] = 12345.0
        with pytest.raises(Refused) as refused:
            pull(server.address, IDENT, transports=["mooncake"], verify=False)
        assert refused.value.code == "changed"


def test_the_upload_cap_paces_what_clients_may_read():
    """Reads bypass the server, but each chunk is granted under the cap first."""
    tensors = {k: v for k, v in big_cases().items() if k in ("w0", "w1", "w2", "w3")}
    rate = 40e6
    options = ServeOptions(max_upload_rate=rate, mooncake=ON.mooncake)
    with in_process_server(tensors, options=options) as server:
        start = time.monotonic()
        result = pull(server.address, IDENT, transports=["mooncake"])
        seconds = time.monotonic() - start
    assert result.transport == "mooncake"
    assert seconds >= (result.total_bytes - (4 << 20)) / rate  # the first chunk goes at once


def test_a_relay_grants_only_chunks_it_has_verified_and_stops_when_withdrawn():
    """A byte flips in one chunk the relay receives. A downstream client that does not even
    verify reads from the relay over mooncake: it is refused once the relay's own check fails,
    and every chunk it read before that is one the relay had verified."""
    seed = Server(big_cases(), IDENT, max_upload_rate=20e6).start()
    relay = Server(None, IDENT, options=ON).start()
    flip_at = 40 << 20

    def start_reader(nbytes: int) -> None:
        if not reader.is_alive() and not downstream:
            reader.start()

    downstream: list = []

    def read() -> None:
        try:
            downstream.append(pull(relay.address, IDENT, verify=False, transports=["mooncake"]))
        except Refused as exc:
            downstream.append(exc)

    reader = threading.Thread(target=read)
    tampered = _flipping_proxy(seed.address, flip_at)
    try:
        with pytest.raises(IntegrityError):
            pull([tampered.address], IDENT, relay=relay, streams=1, progress=start_reader)
        reader.join(60)
        assert isinstance(downstream[0], Refused), downstream
        assert "its own pull failed" in str(downstream[0])
    finally:
        relay.close()
        tampered.close()
        seed.close()


def _flipping_proxy(address: str, position: int):
    from helpers import Proxy

    def flip(conn, offset, data):
        if conn == 1 and offset <= position < offset + len(data):
            data = bytearray(data)
            data[position - offset] ^= 0x10
            return bytes(data)
        return data

    return Proxy(address, flip, per_connection=True)


# --- between namespace hosts ---------------------------------------------------------------

AGAIN = re.compile(r", (\d+) bytes fetched again")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, tensors = bed_checkpoint(tmp_path_factory, 48 << 20, seed=5)
    token = folder.parent / "token"
    token.write_bytes(TOKEN)
    return folder, tensors, token


def _serve(host, folder: Path, token: Path, log, *extra: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "netloader", "serve", folder, "--host", host.address]
    proc = host.popen(
        [*argv, "--token-file", token, "--mooncake", "on", *extra],  # extra may turn it off
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def _pull(host, sources: list[str], token: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "netloader", "pull", *sources, "--out", out]
    return host.popen(
        [*argv, "--token-file", token, "--max-sources", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_mixed_sources_between_hosts_one_over_mooncake_one_over_tcp(checkpoint, tmp_path):
    """Two seeds, one offering mooncake and one with it off: the client (default transports)
    reads from the first one-sided and streams from the second, bit-exact."""
    folder, tensors, token = checkpoint
    hosts = {"a": "200mbit", "b": "200mbit", "client": "1gbit"}
    with (
        NetBed(hosts) as bed,
        open(tmp_path / "a.log", "w+") as a_log,
        open(tmp_path / "b.log", "w+") as b_log,
    ):
        _, a = _serve(bed["a"], folder, token, a_log)
        _, b = _serve(bed["b"], folder, token, b_log, "--mooncake", "off")
        proc = _pull(bed["client"], [a, b], token, tmp_path / "out")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        shares = dict(SHARE.findall(out))
        assert set(shares) == {a, b} and all(int(n) > 0 for n in shares.values()), out
        wait_for(lambda: "over mooncake" in _said(tmp_path / "a.log"), 10, "a's log")
        wait_for(lambda: "over tcp" in _said(tmp_path / "b.log"), 10, "b's log")
    assert_same(tensors, load_file(tmp_path / "out" / "model.safetensors"))


def _said(log: Path) -> str:
    return log.read_text()


def test_a_source_killed_mid_way_costs_only_its_chunks_in_flight(checkpoint, tmp_path):
    """Two seeds on 100 Mbit/s links; one is killed once it sent a quarter of the model. The
    chunks it had been granted (at most ``WINDOW``) come from the other, bit-exact."""
    folder, tensors, token = checkpoint
    hosts = {"a": "100mbit", "b": "100mbit", "client": "1gbit"}
    size = sum(t.nbytes for t in tensors.values())
    with NetBed(hosts) as bed:
        victim, a = _serve(bed["a"], folder, token, subprocess.DEVNULL)
        _, b = _serve(bed["b"], folder, token, subprocess.DEVNULL)
        sent = bed["a"].tx_bytes()
        proc = _pull(bed["client"], [a, b], token, tmp_path / "out")
        wait_for(lambda: bed["a"].tx_bytes() - sent > size // 4, 120, "a quarter from a")
        victim.kill()
        assert bed["a"].tx_bytes() - sent < size  # mid-way
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "over mooncake" in out, out
        shares = {k: int(n) for k, n in SHARE.findall(out)} or {b: size}  # b alone delivered
        assert shares[b] > 0 and shares.get(a, 0) < size, out
        again = AGAIN.search(out)
        assert again is None or int(again[1]) <= WINDOW * (4 << 20), out
    assert_same(tensors, load_file(tmp_path / "out" / "model.safetensors"))


def test_without_mooncake_the_transport_is_absent_with_the_reason(tmp_path):
    """A process that cannot import Mooncake says why in ``info``; asking for it by name is a
    clear error, and the default proposal leaves it out (the pull goes over TCP)."""
    shim = tmp_path / "shim" / "mooncake"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('simulated: not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim.parent), *sys.path]))

    def netloader(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "netloader", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    with in_process_server(all_cases()) as server:
        here = json.loads(netloader("info", server.address).stdout)["transports_here"]
        assert here["mooncake"].startswith("absent: mooncake is not importable"), here
        assert "simulated: not installed here" in here["mooncake"] and here["tcp"] == "available"
        named = netloader("pull", server.address, "--transport", "mooncake,tcp")
        assert named.returncode != 0
        assert "transport 'mooncake' cannot run here: mooncake is not importable" in named.stderr
        default = netloader("pull", server.address)
        assert default.returncode == 0 and "over tcp" in default.stdout, default.stderr


@pytest.mark.parametrize(
    ("offer", "complaint"),
    [
        ({"segment": "10.0.0.1:15000", "protocol": "tcp"}, "must hold"),
        ({"segment": "nowhere", "protocol": "tcp", "regions": []}, "is not IP:PORT"),
        ({"segment": "10.0.0.1:15000", "protocol": "ib", "regions": []}, "protocol 'ib'"),
        ({"segment": "10.0.0.1:15000", "protocol": "tcp", "regions": [None]}, "1 regions for 2"),
        (
            {"segment": "10.0.0.1:1", "protocol": "tcp", "regions": [[4096, 99], None]},
            "slot 0 must be [address, 100]",
        ),
        (
            {"segment": "10.0.0.1:1", "protocol": "tcp", "regions": [[0, 100], None]},
            "slot 0 must be",
        ),
    ],
)
def test_a_bad_offer_is_refused_naming_what_is_wrong(offer, complaint):
    """The client checks the server's offer against its own plan before it reads anything:
    every length is its own slot's, so reads land only in its own buffers."""
    from netloader.errors import ProtocolError
    from netloader.plan import Plan
    from netloader.transport.mooncake import parse_offer

    with pytest.raises(ProtocolError, match=re.escape(complaint)):
        parse_offer(offer, Plan([100, 0], 64 << 10))


def test_transports_reach_the_client_from_every_surface():
    """``--transport``, ``TRANSPORTS`` and ``PullOptions.transports`` set the same thing; an
    unknown name stops a vLLM worker's start-up with the names it knows."""
    from netloader import cli
    from netloader.errors import ConfigError
    from netloader.integrations.vllm.config import NetloaderConfig
    from netloader.options import PullOptions

    parsed = cli._parser().parse_args(["pull", "h:1", "--transport", "mooncake, tcp"])
    assert cli._pull_options(parsed).transports == ("mooncake", "tcp")
    assert NetloaderConfig.parse({"TRANSPORTS": ["mooncake", "tcp"]}).pull.transports == (
        "mooncake",
        "tcp",
    )
    assert PullOptions(transports=["mooncake", "tcp"]).transports == ("mooncake", "tcp")
    with pytest.raises(ConfigError, match="unknown transport 'rdma'; known: "):
        NetloaderConfig.parse({"TRANSPORTS": ["rdma", "tcp"]})
