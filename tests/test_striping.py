"""Several sources at once: every source that serves the same content carries a share; a source
that dies, stalls or corrupts a chunk costs only its chunks in flight; other content is never
mixed in. Real server processes over 127.0.0.1; each source's upload is capped so that all of
them are still sending when the others join (loopback has no link to saturate)."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    Proxy,
    ServerProcess,
    all_cases,
    assert_same,
    big_cases,
    flip_in_data,
    kill_after,
    zeros_like_all,
)

from netloader import AllSourcesFailed, ConfigError, Identity, IntegrityError, PeerClosed, pull
from netloader.options import parse_rate
from netloader.transport.chunks import WINDOW

IDENT = Identity("test-model")
CHUNK = 64 << 10
NETLOADER = str(Path(sys.executable).with_name("netloader"))


def sources(count: int, rate: float = 4e6, **kwargs):
    """``count`` server processes serving all_cases() in 64 KiB chunks, each capped at ``rate``."""
    return [ServerProcess(chunk_size=CHUNK, max_upload_rate=rate, **kwargs) for _ in range(count)]


@pytest.fixture(scope="module")
def three():
    servers = sources(3)
    for s in servers:
        s.__enter__()
    yield servers
    for s in servers:
        s.__exit__(None, None, None)


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_every_case_bit_exact_from_three_sources_each_carrying_a_share(three, transport):
    expected = all_cases()
    dest = zeros_like_all(expected)
    result = pull([s.address for s in three], IDENT, into=dest, transports=[transport])
    assert_same(expected, dest)
    assert list(result.sources) == [s.address for s in three]
    assert all(result.sources.values()), result.sources  # every source delivered chunks
    assert sum(result.sources.values()) == result.total_bytes
    # Nothing failed: at most endgame copies of chunks in flight (3 sources x 2 streams x 2).
    assert result.refetched <= 3 * 2 * WINDOW * CHUNK


def test_fresh_tensors_from_three_sources(three):
    result = pull([s.address for s in three], IDENT)
    assert_same(all_cases(), result.tensors)
    assert result.tensors["lm_head.weight"] is result.tensors["embed.weight"]
    assert all(result.sources.values()), result.sources


def test_max_sources_bounds_the_sources_at_work(three):
    result = pull([s.address for s in three], IDENT, max_sources=2)
    assert_same(all_cases(), result.tensors)
    assert list(result.sources) == [s.address for s in three[:2]]


def test_other_bytes_under_the_same_name_are_not_mixed_in(three, caplog):
    """A source whose tensors have the same names, shapes and dtypes but other bytes: its
    digests differ from the first source's, so it is not used; the content is the first's."""
    caplog.set_level(logging.WARNING, "netloader.client")
    with ServerProcess(seed=1, chunk_size=CHUNK) as other:
        result = pull([three[0].address, other.address], IDENT)
        assert_same(all_cases(seed=0), result.tensors)
        assert result.sources == {three[0].address: result.total_bytes}
        assert "its chunk digests differ from the first source's" in caplog.text
        # Listed first, it defines the content and the seed-0 source is the odd one out.
        result = pull([other.address, three[0].address], IDENT)
        assert_same(all_cases(seed=1), result.tensors)
        assert result.sources == {other.address: result.total_bytes}


def test_a_source_refusing_is_skipped(three):
    with ServerProcess(identity=Identity("other-model"), chunk_size=CHUNK) as wrong:
        result = pull([three[0].address, wrong.address, three[1].address], IDENT)
    assert_same(all_cases(), result.tensors)
    assert wrong.address not in result.sources
    assert result.sources[three[1].address] > 0


@pytest.mark.parametrize("after", [150_000, 900_000, 1_800_000])
def test_a_source_killed_mid_transfer_costs_only_its_chunks_in_flight(after):
    """SIGKILL one of two sources once ``after`` bytes of its answers went through: the pull
    completes bit-exact from the other, and only that source's chunks in flight are fetched
    again (at most WINDOW per stream). The doomed source is the faster one, so that it would
    carry about three quarters of the 3.6 MB if it lived."""
    with (
        ServerProcess(chunk_size=CHUNK, max_upload_rate=3e6) as doomed,
        sources(1, rate=1e6)[0] as other,
    ):
        proxy = Proxy(doomed.address, kill_after(after, doomed.kill))
        try:
            result = pull([proxy.address, other.address], IDENT, streams=2)
        finally:
            proxy.close()
        assert not doomed.process.is_alive()
    assert_same(all_cases(), result.tensors)
    assert 0 < result.sources[proxy.address] < result.total_bytes
    # Besides copies of chunks late at the slower source (``copied``).
    assert result.refetched - result.copied <= 2 * WINDOW * CHUNK
    assert sum(result.sources.values()) == result.total_bytes


def test_a_stalled_source_is_dropped_and_its_chunks_taken_elsewhere():
    """A source that stops (SIGSTOP) mid-transfer: after the idle limit the client gives up on
    it and the other source delivers what it held."""
    with ServerProcess(chunk_size=CHUNK, max_upload_rate=2e6) as frozen, sources(1)[0] as other:
        proxy = Proxy(frozen.address, stop_after(300_000, frozen))
        try:
            result = pull([proxy.address, other.address], IDENT, idle_timeout=1.0)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
            proxy.close()
    assert_same(all_cases(), result.tensors)
    assert 0 < result.sources[proxy.address] < result.total_bytes
    assert result.refetched > 0


def stop_after(nbytes: int, server: ServerProcess):
    """A Proxy tamper function: once ``nbytes`` went through, freeze the server (SIGSTOP) and
    keep every connection open, so that the client sees silence, not a closed connection."""
    stopped = []

    def tamper(offset: int, data: bytes) -> bytes:
        if offset > nbytes and not stopped:
            stopped.append(True)
            os.kill(server.process.pid, signal.SIGSTOP)
        return data

    return tamper


def test_a_source_sending_a_flipped_byte_is_dropped_and_the_pull_completes(caplog):
    caplog.set_level(logging.WARNING, "netloader.client")
    with sources(1, rate=2e6)[0] as liar, sources(1)[0] as other:
        proxy = Proxy(liar.address, flip_in_data(50_000), per_connection=True)
        try:
            result = pull([proxy.address, other.address], IDENT, streams=1)
        finally:
            proxy.close()
        # The server behind the flip re-checked itself, found its tensors intact, still serves.
        assert_same(all_cases(), pull(liar.address, IDENT).tensors)
    assert_same(all_cases(), result.tensors)
    assert "does not match the server's digest" in caplog.text
    assert result.sources[other.address] > 0


def test_with_a_single_source_a_failure_still_fails_the_pull():
    with ServerProcess(chunk_size=CHUNK, max_upload_rate=2e6) as only:
        proxy = Proxy(only.address, kill_after(200_000, only.kill))
        try:
            with pytest.raises(PeerClosed) as info:
                pull(proxy.address, IDENT)
        finally:
            proxy.close()
    assert info.value.partial


def test_corrupt_single_source_fails_with_the_integrity_error():
    with sources(1)[0] as liar:
        proxy = Proxy(liar.address, flip_in_data(50_000), per_connection=True)
        try:
            with pytest.raises(IntegrityError):
                pull(proxy.address, IDENT, streams=1)
        finally:
            proxy.close()


def test_all_sources_dying_fails_with_every_reason():
    """The second source dies first, yet the reasons come in the order the sources were given."""
    with (
        ServerProcess(builder="helpers:big_cases") as a,
        ServerProcess(builder="helpers:big_cases") as b,
    ):
        pa = Proxy(a.address, kill_after(8 << 20, a.kill))
        pb = Proxy(b.address, kill_after(1 << 16, b.kill))
        try:
            with pytest.raises(AllSourcesFailed) as info:
                pull([pa.address, pb.address], IDENT)
        finally:
            pa.close()
            pb.close()
    assert info.value.partial
    assert [e.source for e in info.value.errors] == [pa.address, pb.address]
    assert all(isinstance(e, PeerClosed) for e in info.value.errors)


def test_upload_cap_holds_across_clients():
    """Two clients pull 64 MiB each at once from one server capped at 64 MB/s: however the
    machine's load varies, the cap means it cannot take less than the bytes over the rate."""
    import threading
    import time

    rate = 64e6
    with ServerProcess(builder="helpers:big_cases", max_upload_rate=rate) as srv:
        results = []
        start = time.monotonic()
        threads = [
            threading.Thread(target=lambda: results.append(pull(srv.address, IDENT)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
    total = sum(r.total_bytes for r in results)
    assert len(results) == 2
    first_chunk = 4 << 20  # the pacer lets the first chunk go at once
    assert elapsed >= (total - first_chunk) / rate
    for r in results:
        assert_same(big_cases(), r.tensors)


def test_rates_parse_with_units():
    assert parse_rate("100MB/s") == 100e6
    assert parse_rate("800Mbit") == 100e6
    assert parse_rate("1GiB/s") == float(1 << 30)
    assert parse_rate(5_000) == 5000.0
    for bad in ("fast", "0", "-3MB/s", True, "inf"):
        with pytest.raises(ConfigError, match="is not a rate"):
            parse_rate(bad)


def test_cli_pulls_from_several_sources_and_says_how_much_each_sent(three, tmp_path):
    proc = subprocess.run(
        [NETLOADER, "pull", three[0].address, three[1].address, "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    for s in three[:2]:
        assert f"{s.address} (" in line and " bytes)" in line, line
    from safetensors.torch import load_file

    assert_same(all_cases(), load_file(tmp_path / "model.safetensors"))


def test_cli_refuses_a_bad_rate_and_bad_max_sources(three):
    serve = subprocess.run(
        [NETLOADER, "serve", ".", "--max-upload-rate", "lots"], capture_output=True, text=True
    )
    assert serve.returncode == 2
    assert "--max-upload-rate = 'lots' is not a rate" in serve.stderr
    bad = subprocess.run(
        [NETLOADER, "pull", three[0].address, "--max-sources", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "max_sources must be an integer >= 1, got 0" in bad.stderr
