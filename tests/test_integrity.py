"""Every received byte is checked against the digest the server took at capture."""

import logging
import threading

import pytest
import torch
from helpers import (
    STREAM_PREAMBLE,
    Proxy,
    ServerProcess,
    all_cases,
    assert_same,
    in_process_server,
    wait_for,
)

from netloader import Identity, IntegrityError, PullError, Refused, pull
from netloader.transport.chunks import CHUNK_HEADER

IDENT = Identity("test-model")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(chunk_size=64 << 10) as srv:
        yield srv


def flip_at(target_conn: int, position: int, flipped: threading.Event | None = None):
    def tamper(conn, offset, data):
        if conn == target_conn and offset <= position < offset + len(data):
            data = bytearray(data)
            data[position - offset] ^= 0x01
            if flipped is not None:
                flipped.set()
            return bytes(data)
        return data

    return tamper


# A data connection carries the server's greeting and its confirmation that it holds the
# session (the client asks, since the Accept names the server's own address), then per chunk
# its 8-byte index and bytes; with one stream the chunks go out in order.
CHUNK = 64 << 10
ON_WIRE = CHUNK_HEADER.size + CHUNK


def in_chunk(index: int, offset: int) -> int:
    """Position on a single data stream of byte ``offset`` of chunk ``index``."""
    return STREAM_PREAMBLE + index * ON_WIRE + CHUNK_HEADER.size + offset


def chunk_error(index: int) -> str:
    return rf"chunk {index} \(bytes {index * CHUNK}\.\.{(index + 1) * CHUNK}\) does not match the server's digest"


@pytest.mark.parametrize(
    "chunk, offset", [(0, 0), (0, 40_000), (1, 0), (15, 12_345), (30, CHUNK - 1)]
)
def test_a_flipped_weight_byte_is_detected_in_its_chunk(server, chunk, offset):
    # Connection 0 is the control connection, 1 the (only) data stream.
    proxy = Proxy(server.address, flip_at(1, in_chunk(chunk, offset)), per_connection=True)
    try:
        dest = {n: torch.empty_like(t) for n, t in all_cases().items()}
        with pytest.raises(IntegrityError, match=chunk_error(chunk)) as info:
            pull(proxy.address, IDENT, into=dest, streams=1)
        assert info.value.partial
    finally:
        proxy.close()


def test_a_flipped_chunk_index_is_bad_data(server):
    """The top byte of chunk 2's index: an index far outside the plan."""
    proxy = Proxy(server.address, flip_at(1, in_chunk(2, 0) - 8), per_connection=True)
    try:
        with pytest.raises(
            PullError,
            match=r"bad data from server during transfer: "
            r"server sent chunk 72057594037927938, not the requested 2",
        ) as info:
            pull(proxy.address, IDENT, streams=1)
        assert type(info.value) is PullError and info.value.partial
    finally:
        proxy.close()


def test_a_chunk_index_turned_into_another_is_bad_data(server):
    """The low byte of chunk 2's index: its bytes arrive labelled as chunk 3, which is not the
    chunk the client asked for on that stream."""
    proxy = Proxy(server.address, flip_at(1, in_chunk(2, 0) - 1), per_connection=True)
    try:
        with pytest.raises(PullError, match="server sent chunk 3, not the requested 2") as info:
            pull(proxy.address, IDENT, streams=1)
        assert type(info.value) is PullError and info.value.partial
    finally:
        proxy.close()


def test_a_flip_on_another_stream_of_several_is_detected():
    """Three data streams; the first is held back at the relay until a weight byte on one of
    the others has been flipped, so the flip lands whichever way the chunks are shared out
    (64 MiB do not fit in the held stream's socket buffers: the others must carry chunks)."""
    flipped = threading.Event()

    def tamper(conn, offset, data):
        if conn == 1 and offset >= STREAM_PREAMBLE:
            flipped.wait(60)
        elif conn >= 2 and not flipped.is_set():
            data = flip_at(conn, in_chunk(0, 100), flipped)(conn, offset, data)
        return data

    with ServerProcess(builder="helpers:big_cases", chunk_size=CHUNK) as srv:
        proxy = Proxy(srv.address, tamper, per_connection=True)
        try:
            with pytest.raises(
                IntegrityError, match=r"chunk \d+ \(bytes \d+\.\.\d+\) does not match"
            ) as info:
                pull(proxy.address, IDENT, streams=3)
            assert flipped.is_set() and proxy.connections == 4
            assert info.value.partial
        finally:
            proxy.close()


def test_process_group_transfer_is_verified_too():
    """gloo's own connections cannot be relayed, so the bytes are changed at the source: a
    served tensor is written to after capture (the server does not re-check before sending)."""
    tensors = all_cases()
    server = in_process_server(tensors, chunk_size=CHUNK, idle_timeout=3.0)
    try:
        tensors["big"][1, 5] += 1.0
        # "big" is served last, after every other tensor but lm_head (tied: it travels once).
        big = sum(t.nbytes for n, t in tensors.items() if n not in ("big", "lm_head.weight"))
        with pytest.raises(
            IntegrityError, match=chunk_error((big + (300_000 + 5) * 4) // CHUNK)
        ) as info:
            pull(server.address, IDENT, transports=["gloo"])
        assert info.value.partial
    finally:
        server.close()


def test_an_untouched_relay_changes_nothing(server):
    proxy = Proxy(server.address)
    try:
        assert_same(all_cases(), pull(proxy.address, IDENT).tensors)
    finally:
        proxy.close()


def test_changed_tensor_is_caught_then_refused(caplog):
    """Someone writes into a served tensor after capture. The next client's check fails on
    those bytes; it tells the server, which re-hashes and refuses every later pull."""
    caplog.set_level(logging.WARNING, "netloader")
    tensors = all_cases()
    server = in_process_server(tensors, chunk_size=64 << 10)
    try:
        tensors["big"][1, 5] += 1.0
        with pytest.raises(IntegrityError):
            pull(server.address, IDENT)
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT)
        assert info.value.code == "unavailable"
        assert "data changed since capture in chunks holding 1 tensor(s): 'big'" in str(info.value)
    finally:
        server.close()


def test_verify_before_send_refuses_changed_tensors_up_front(caplog):
    caplog.set_level(logging.WARNING, "netloader.server")
    tensors = all_cases()
    server = in_process_server(tensors, verify_before_send=True, chunk_size=64 << 10)
    try:
        tensors["big"][2, 1000] = 12345.0
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT)
        assert info.value.code == "changed"
        assert "data changed since capture in chunks holding 1 tensor(s): 'big'" in str(info.value)
        # The client hears of it on the data stream, a moment before the session's thread
        # marks the server unavailable (and logs so).
        wait_for(lambda: "refusing further pulls" in caplog.text, 10, "the server's verdict")
        with pytest.raises(Refused) as info:  # and every later pull is refused up front
            pull(server.address, IDENT)
        assert info.value.code == "unavailable"
    finally:
        server.close()


def test_transit_corruption_leaves_the_server_available(server, caplog):
    """After a corrupted transfer the server re-checks itself, finds its tensors intact, and
    keeps serving."""
    proxy = Proxy(server.address, flip_at(1, in_chunk(0, 5000)), per_connection=True)
    try:
        with pytest.raises(IntegrityError):
            pull(proxy.address, IDENT, streams=1)
    finally:
        proxy.close()
    assert_same(all_cases(), pull(server.address, IDENT).tensors)
