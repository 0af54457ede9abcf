"""Relays and discovery over 127.0.0.1: a client with a server of its own serves every chunk
onwards as soon as it has verified it, and its source sends later clients to it, so that a
group started together forms a chain. Real server processes (``netloader serve --from``) where
a process must die; threads of this process where the registry is inspected."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import Proxy, Serve, ServerProcess, all_cases, assert_same, big_cases, kill_after
from safetensors.torch import save_file

from netloader import Identity, IntegrityError, PeerClosed, Refused, Server, info, pull

IDENT = Identity("test-model")
NETLOADER = str(Path(sys.executable).with_name("netloader"))
TOKEN = b"relay-test-shared-secret-0123"


def relay_server(**kwargs) -> Server:
    return Server(None, IDENT, **kwargs).start()


def pull_all(sources: list[str], relays: list[Server], **kwargs) -> list:
    """One pull per relay, all started together; results in the relays' order."""
    results: list = [None] * len(relays)

    def run(i: int) -> None:
        try:
            results[i] = pull(sources, IDENT, relay=relays[i], **kwargs)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(relays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_relays_started_together_form_a_chain_and_each_is_bit_exact():
    """Three relays naming only the seed: the seed serves the first, and sends each later one
    to the relay that joined just before it; every relay ends bit-exact and keeps serving."""
    seed = Server(big_cases(), IDENT, max_upload_rate=40e6).start()
    relays = [relay_server() for _ in range(3)]
    try:
        results = pull_all([seed.address], relays)
        for r in results:
            assert not isinstance(r, Exception), r
            assert_same(big_cases(), r.tensors)
        # A chain: each relay took all its chunks from one node, no node fed two relays, and
        # the seed fed exactly one of them (its uplink carried the model once).
        feeders = [list(r.sources) for r in results]
        assert all(len(f) == 1 for f in feeders), feeders
        feeders = [f[0] for f in feeders]
        assert len(set(feeders)) == 3, feeders
        assert feeders.count(seed.address) == 1, feeders
        assert set(feeders) - {seed.address} <= {r.address for r in relays}
        # The seed keeps all three as members holding the model, in the order they joined.
        members = seed.peers.wait_for(lambda ms: all(m.holds for m in ms), timeout=10)
        assert {m.address for m in members} == {r.address for r in relays}
        assert all(m.holds for m in members)
        # A finished relay serves the whole model itself.
        assert_same(big_cases(), pull(relays[-1].address, IDENT).tensors)
    finally:
        for s in [*relays, seed]:
            s.close()


def test_a_closed_relay_is_forgotten_by_its_source():
    seed = Server(all_cases(), IDENT).start()
    relay = relay_server()
    try:
        pull([seed.address], IDENT, relay=relay)
        assert [m.address for m in seed.peers.members()] == [relay.address]
        relay.close()
        assert not seed.peers.wait_for(lambda members: not members, timeout=10)
    finally:
        relay.close()
        seed.close()


def test_without_discovery_every_client_pulls_from_the_listed_source():
    seed = Server(big_cases(), IDENT).start()
    relays = [relay_server() for _ in range(2)]
    try:
        results = pull_all([seed.address], relays, discovery=False)
        assert [list(r.sources) for r in results] == [[seed.address]] * 2
        assert not seed.peers.members()
    finally:
        for s in [*relays, seed]:
            s.close()


def test_a_relay_whose_pull_fails_stops_serving_and_is_forgotten():
    """The relay's only source dies mid-transfer: its pull fails, its server refuses every
    peer with the reason, and the source no longer counts it as a member."""
    with ServerProcess(builder="helpers:big_cases", max_upload_rate=20e6) as seed:
        proxy = Proxy(seed.address, kill_after(8 << 20, seed.kill))
        relay = relay_server()
        try:
            with pytest.raises(PeerClosed):
                pull([proxy.address], IDENT, relay=relay)
            with pytest.raises(Refused) as info:
                pull(relay.address, IDENT)
            assert info.value.code == "unavailable"
            assert "its own pull failed" in str(info.value)
        finally:
            relay.close()
            proxy.close()


def test_a_relay_never_sends_a_chunk_it_could_not_verify():
    """A byte flips between the seed and the relay. A client that does not even verify starts
    pulling from the relay as soon as its first chunk landed: it gets a refusal once the relay's
    own check fails, never the corrupt chunk or one that has not arrived."""
    seed = Server(big_cases(), IDENT, max_upload_rate=20e6).start()

    def flip(conn, offset, data):
        if conn == 1 and offset <= 6_000_000 < offset + len(data):
            data = bytearray(data)
            data[6_000_000 - offset] ^= 0x10
            return bytes(data)
        return data

    proxy = Proxy(seed.address, flip, per_connection=True)
    relay = relay_server()
    downstream: list = []
    reader = threading.Thread(
        target=lambda: downstream.append(_try(lambda: pull(relay.address, IDENT, verify=False)))
    )

    def start_reader(nbytes: int) -> None:
        if not reader.is_alive() and not downstream:
            reader.start()

    try:
        with pytest.raises(IntegrityError):
            pull([proxy.address], IDENT, relay=relay, streams=1, progress=start_reader)
        reader.join(60)
        assert isinstance(downstream[0], Refused), downstream
        assert "its own pull failed" in str(downstream[0])
    finally:
        relay.close()
        proxy.close()
        seed.close()


def _try(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_a_client_asking_a_relay_for_another_model_is_refused():
    seed = Server(all_cases(), IDENT).start()
    relay = relay_server()
    try:
        pull([seed.address], IDENT, relay=relay)
        with pytest.raises(Refused) as info:
            pull(relay.address, Identity("other-model"))
        assert info.value.code == "model"
        with pytest.raises(Refused) as info:
            pull(relay.address, Identity("test-model", rank=1, world_size=2))
        assert info.value.code == "layout"
    finally:
        relay.close()
        seed.close()


# --- netloader serve --from ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "relay-model"
    folder.mkdir()
    tensors = big_cases()
    save_file(tensors, folder / "model.safetensors")
    return folder, tensors


def test_serve_from_listens_at_once_pulls_then_serves(checkpoint, tmp_path):
    folder, tensors = checkpoint
    seed = Serve(folder, "--max-upload-rate", "50MB/s")
    replica = Serve("--from", seed.address)  # it printed "listening on" before its pull ended
    line = replica.next_line()
    assert re.fullmatch(
        rf"pulled {sum(t.nbytes for t in tensors.values())} bytes in [\d.]+ s \([\d.]+ GB/s\) "
        rf"from {re.escape(seed.address)} over tcp x\d+ \(verified, serving\)\n",
        line,
    ), line
    out = subprocess.run(
        [NETLOADER, "pull", replica.address, "--out", tmp_path / "copy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    from safetensors.torch import load_file

    assert_same(tensors, load_file(tmp_path / "copy" / "model.safetensors"))
    assert replica.stop()[0] == 0
    assert seed.stop()[0] == 0


def test_serve_from_a_dead_source_fails_with_the_reason():
    proc = subprocess.run(
        [NETLOADER, "serve", "--from", "127.0.0.1:9"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "127.0.0.1:9" in proc.stderr and "cannot connect" in proc.stderr


def test_serve_from_with_a_wrong_token_exits_non_zero(checkpoint, tmp_path):
    folder, _ = checkpoint
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_bytes(TOKEN)
    wrong.write_bytes(b"not-the-right-secret-at-all")
    seed = Serve(folder, "--token-file", right)
    try:
        proc = subprocess.run(
            [NETLOADER, "serve", "--from", seed.address, "--token-file", wrong],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "wrong token" in proc.stderr
        # A relay with the right token proves it both ways, and serves only token holders.
        relay = Serve("--from", seed.address, "--token-file", right)
        assert relay.next_line().startswith("pulled ")
        with pytest.raises(Refused) as info:
            pull(relay.address, Identity("relay-model"), token=b"x" * 16 + b"-wrong-token")
        assert info.value.code == "auth"
        assert relay.stop()[0] == 0
    finally:
        seed.stop()


def test_serve_needs_a_path_or_sources():
    proc = subprocess.run([NETLOADER, "serve"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "give either a checkpoint PATH to serve or --from SOURCE" in proc.stderr


def test_a_relay_killed_mid_transfer_costs_its_downstream_only_the_chunks_in_flight(checkpoint):
    """seed -> r1 -> r2: r1 (a process) is killed while r2 pulls from it; r2 asks the seed
    again, avoiding r1, and finishes bit-exact from it."""
    folder, tensors = checkpoint
    ident = Identity("relay-model")
    seed = Serve(folder, "--max-upload-rate", "16MB/s")
    r1 = Serve("--from", seed.address)
    # r1 answers once its own pull was accepted, i.e. once the seed counts it as a member: only
    # then is r2 sent to it (otherwise, on a loaded machine, r2 could be first in the chain).
    assert info(r1.address).identity == ident
    r2 = Server(None, ident).start()
    received = [0]

    def progress(nbytes: int) -> None:  # kill r1 once r2 has 20 MB
        received[0] += nbytes
        if received[0] > 20_000_000 and r1.proc.poll() is None:
            r1.proc.kill()

    try:
        result = pull([seed.address], ident, relay=r2, progress=progress)
    finally:
        r2.close()
        r1.proc.kill()
        r1.proc.wait()
        seed.stop()
    assert_same(tensors, result.tensors)
    assert set(result.sources) == {r1.address, seed.address}, result.sources
    assert result.sources[r1.address] >= 20_000_000
    # At most 2 streams x 2 chunks in flight, besides copies of chunks late at the slower one.
    assert result.refetched - result.copied <= 2 * 2 * (4 << 20)
