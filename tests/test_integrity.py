"""Every received byte is checked against the digest the server took at capture."""

import logging

import pytest
import torch
from helpers import Proxy, ServerProcess, all_cases, assert_same, in_process_server

from netloader import Identity, IntegrityError, Refused, pull
from netloader.options import DEFAULT_CHUNK
from netloader.protocol import HEADER

IDENT = Identity("test-model")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(chunk_size=64 << 10) as srv:
        yield srv


def flip_at(target_conn: int, position: int):
    def tamper(conn, offset, data):
        if conn == target_conn and offset <= position < offset + len(data):
            data = bytearray(data)
            data[position - offset] ^= 0x01
            return bytes(data)
        return data

    return tamper


@pytest.mark.parametrize(
    "position",
    [
        100,  # the first weight bytes of the first chunk this stream carries
        40_000,
        65_600,  # around the second chunk's header
        1_000_000,
        1_900_000,
    ],
)
def test_a_flipped_byte_anywhere_in_the_data_is_detected(server, position):
    # Connection 0 is the control connection, 1 the (only) data stream; a flip past the
    # server's greeting frame lands in chunk headers or weight bytes.
    hello = 8 + HEADER.size + 80  # generous bound on the Hello frame
    proxy = Proxy(server.address, flip_at(1, hello + position), per_connection=True)
    try:
        dest = {n: torch.empty_like(t) for n, t in all_cases().items()}
        with pytest.raises((IntegrityError, Exception)) as info:
            pull(proxy.address, IDENT, into=dest, streams=1)
        assert isinstance(info.value, IntegrityError) or "bad data" in str(info.value)
        assert info.value.partial
    finally:
        proxy.close()


def test_a_flipped_weight_byte_names_the_chunk(server):
    proxy = Proxy(server.address, flip_at(1, 5000), per_connection=True)
    try:
        with pytest.raises(IntegrityError, match=r"chunk \d+ \(bytes \d+\.\.\d+\) does not match"):
            pull(proxy.address, IDENT, streams=1)
    finally:
        proxy.close()


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


def test_verify_before_send_refuses_changed_tensors_up_front():
    tensors = all_cases()
    server = in_process_server(tensors, verify_before_send=True, chunk_size=64 << 10)
    try:
        tensors["big"][2, 1000] = 12345.0
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT)
        assert info.value.code == "changed"
        assert "data changed since capture in chunks holding 1 tensor(s): 'big'" in str(info.value)
        with pytest.raises(Refused) as info:  # and every later pull is refused up front
            pull(server.address, IDENT)
        assert info.value.code == "unavailable"
    finally:
        server.close()


def test_transit_corruption_leaves_the_server_available(server, caplog):
    """After a corrupted transfer the server re-checks itself, finds its tensors intact, and
    keeps serving."""
    proxy = Proxy(server.address, flip_at(1, 5000), per_connection=True)
    try:
        with pytest.raises(IntegrityError):
            pull(proxy.address, IDENT, streams=1)
    finally:
        proxy.close()
    assert_same(all_cases(), pull(server.address, IDENT).tensors)


def test_default_chunk_is_cache_sized():
    assert DEFAULT_CHUNK == 4 << 20
