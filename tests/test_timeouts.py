"""Every wait has a bound: silent, trickling and stalled peers are dropped, on both sides."""

import logging
import select
import socket
import threading
import time

import pytest
from helpers import RawClient, all_cases, assert_same, big_cases, in_process_server

from netloader import Identity, TransferTimeout, pull
from netloader.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Channel,
    Hello,
    PullRequest,
    StreamAttach,
    encode,
)
from netloader.snapshot import Snapshot
from netloader.transport.chunks import CHUNK_HEADER

IDENT = Identity("test-model")


def wait_closed(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closes ``sock`` (reads and discards whatever it sends)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, ConnectionResetError):
        pass
    return time.monotonic() - start


HANDSHAKE_LIMIT = "handshake not finished within 1 s"  # what the server logs when it fires


def test_silent_client_is_dropped_after_the_handshake_limit(caplog):
    caplog.set_level(logging.WARNING, "netloader.server")
    server = in_process_server(all_cases(), handshake_timeout=1.0)  # idle limit: 30 s
    try:
        client = RawClient(server.address)  # reads the Hello, then says nothing
        assert wait_closed(client.sock, 10) < 5
        assert HANDSHAKE_LIMIT in caplog.text
    finally:
        server.close()


def test_trickling_client_cannot_stretch_the_handshake(caplog):
    """One byte every 0.2 s keeps every single wait short (the idle limit is 30 s), but the
    whole handshake has a deadline: the server hangs up at about 1 s, long before the frame
    (a valid request, which it would otherwise accept) is complete."""
    caplog.set_level(logging.WARNING, "netloader.server")
    server = in_process_server(all_cases(), handshake_timeout=1.0, idle_timeout=30)
    try:
        client = RawClient(server.address)
        frame = encode(PullRequest(PROTOCOL_VERSION, IDENT, None, ["tcp"], 1, "00" * 16))
        start = time.monotonic()
        hung_up = None
        for byte in frame:
            try:
                client.sock.send(bytes([byte]))
                readable, _, _ = select.select([client.sock], [], [], 0.2)
                if readable:
                    answer = client.sock.recv(65536)
                    assert not answer, f"server answered instead of hanging up: {answer!r}"
                    hung_up = time.monotonic() - start
            except (ConnectionResetError, BrokenPipeError):
                hung_up = time.monotonic() - start
            if hung_up is not None or time.monotonic() - start > 10:
                break
        assert hung_up is not None, "the server was still waiting for the frame after 10 s"
        assert hung_up < 5
        assert HANDSHAKE_LIMIT in caplog.text  # and the deadline was why
    finally:
        server.close()


def test_slow_reader_is_dropped_and_its_slot_freed():
    """A client that reads its data one byte at a time makes "progress", but completes no
    chunk within the idle limit: the server drops it and serves the next client."""
    server = in_process_server(big_cases(), max_clients=1, idle_timeout=1.0)
    try:
        client = RawClient(server.address)
        accept = client.request_pull(IDENT)
        assert isinstance(accept, Accept)
        data = client.attach(accept.session, rcvbuf=16 << 10)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set() and data.recv(1):
                time.sleep(0.01)

        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        # The only slot is taken; once the watchdog drops the trickler (~1 s), a real pull fits
        # (it may queue behind it meanwhile).
        result = pull(server.address, IDENT, streams=1, handshake_timeout=10)
        assert_same(big_cases(), result.tensors)
        stop.set()
        data.close()
        client.close()
    finally:
        server.close()


class StallingServer:
    """Speaks the protocol up to the data plane, then sends ``prefix`` bytes of the first
    chunk at ``delay`` seconds per byte (0 = all at once) and stops."""

    def __init__(self, tensors, prefix: int, delay: float = 0.0, claims_auth: bool = False):
        self.snapshot = Snapshot(tensors, chunk_size=64 << 10)
        self.prefix, self.delay, self.claims_auth = prefix, delay, claims_auth
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        control, _ = self.listener.accept()
        ch = Channel(control, 10)
        ch.send(Hello(PROTOCOL_VERSION, "00" * 16, self.claims_auth))
        ch.recv(PullRequest)
        s = self.snapshot
        proof = "ab" * 32 if self.claims_auth else None  # an impostor cannot do better
        ch.send(
            Accept(
                "11" * 16,
                IDENT,
                s.manifest,
                s.aliases,
                "tcp",
                1,
                s.plan.chunk_size,
                s.digests,
                mac=proof,
            )
        )
        try:
            data, _ = self.listener.accept()
        except OSError:
            return  # closed: the client gave up before opening its data connection
        self.socks += [control, data]
        dch = Channel(data, 10)
        dch.send(Hello(PROTOCOL_VERSION, "00" * 16, False))
        dch.recv(StreamAttach)
        payload = CHUNK_HEADER.pack(0) + bytes(self.prefix)
        if not self.delay:
            data.sendall(payload)
            return
        for byte in payload:
            try:
                data.send(bytes([byte]))
            except OSError:
                return
            time.sleep(self.delay)

    def close(self) -> None:
        for s in [*self.socks, self.listener]:
            s.close()


def test_client_times_out_when_the_server_stalls():
    fake = StallingServer(all_cases(), prefix=1000)
    try:
        start = time.monotonic()
        with pytest.raises(TransferTimeout) as info:
            pull(fake.address, IDENT, idle_timeout=1.0)
        assert time.monotonic() - start < 6
        assert info.value.partial  # bytes had landed: the destination is not valid
    finally:
        fake.close()


def test_client_drops_a_trickling_server():
    """A byte every 50 ms never leaves a read waiting for 1 s, but no chunk completes."""
    fake = StallingServer(all_cases(), prefix=100_000, delay=0.05)
    try:
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="no chunk completed for 1 s"):
            pull(fake.address, IDENT, idle_timeout=1.0)
        assert time.monotonic() - start < 6
    finally:
        fake.close()


def test_client_handshake_limit():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never speaks
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="handshake"):
            pull(address, IDENT, handshake_timeout=1.0)
        assert time.monotonic() - start < 5
    finally:
        listener.close()
