"""The seams the next engines build on: a transport is one module plus one registration (a
long-lived engine with its own messages and its own offer bound), and what happens is emitted
as events. Real servers and clients over loopback."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from helpers import RawClient, all_cases, assert_same, in_process_server, wait_for, zeros_like_all

from netloader import Identity, Refused, pull
from netloader import events as ev
from netloader.errors import ProtocolError
from netloader.protocol import MESSAGES, OFFER_LIMITS, Accept, Channel, Message, decode
from netloader.protocol.fields import text
from netloader.snapshot import Snapshot
from netloader.transport import ENGINES, Engine, Incoming, Outgoing, Sending, register
from netloader.transport.streams import AttachedSending, Streams
from netloader.transport.tcp import fetch_stream, open_stream, serve_stream

IDENT = Identity("seam-model")
CHUNK = 64 << 10


# --- a transport of the test's own: TCP with a greeting message and a large offer -------------


@dataclass
class Greeting(Message):
    """The test transport's own message, sent first on each of its data connections."""

    kind: ClassVar[str] = "test_greeting"
    motto: str

    @classmethod
    def from_json(cls, o: dict) -> Greeting:
        return cls(text(o, "motto", 64))


BIG_OFFER = {"note": "x" * 10_000}  # more than the default bound of 4096 characters


class GreetingEngine(Engine):
    name = "test_greeting"
    max_streams = 2
    messages = (Greeting,)
    offer_limit = 20_000

    def __init__(self) -> None:
        self.registered: list[Snapshot] = []
        self.transfers = 0

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def register(self, snapshot: Snapshot) -> None:
        self.registered.append(snapshot)

    def sending(self, out: Outgoing) -> Sending:
        self.transfers += 1
        return GreetingSending(out)

    def receive(self, inc: Incoming) -> None:
        assert inc.offer == BIG_OFFER

        def fetch(sock: socket.socket, mark: Any) -> None:
            assert Channel(sock, inc.idle).recv(Greeting).motto == "hello"
            fetch_stream(sock, inc, mark)

        Streams(inc.streams, inc.idle, threading.Event()).run(
            lambda index: open_stream(inc, index), fetch
        )


class GreetingSending(AttachedSending):
    def offer(self) -> dict[str, object]:
        super().offer()
        return BIG_OFFER

    def send(self) -> None:
        def serve(sock: socket.socket, mark: Any) -> None:
            Channel(sock, self.out.idle).send(Greeting("hello"))
            serve_stream(sock, self.out, mark)

        self.run_streams(serve)


@pytest.fixture
def greeting_engine():
    engine = register(GreetingEngine())
    yield engine
    ENGINES.pop(engine.name)
    MESSAGES.pop(Greeting.kind)
    OFFER_LIMITS.pop(engine.name)


def test_a_new_transport_is_one_module_and_one_registration(greeting_engine):
    tensors = all_cases()
    with in_process_server(tensors, IDENT, chunk_size=CHUNK) as server:
        assert greeting_engine.registered == [server.snapshot]  # once per served model
        for _ in range(2):
            dest = zeros_like_all(tensors)
            result = pull(server.address, IDENT, into=dest, transports=["test_greeting"])
            assert (result.transport, result.streams) == ("test_greeting", 2)
            assert_same(tensors, dest)
    # One engine for the process: both transfers went through it, the snapshot was
    # registered once.
    assert greeting_engine.transfers == 2
    assert len(greeting_engine.registered) == 1


def test_another_transport_keeps_the_default_offer_bound(greeting_engine):
    """The large offer is allowed for its own transport only: an Accept naming TCP with it
    is refused by the client's decoder."""
    accept = {
        "kind": "accept",
        "session": "00" * 16,
        "identity": IDENT.to_json(),
        "manifest": [],
        "aliases": [],
        "streams": 1,
        "chunk_size": CHUNK,
        "digests": None,
        "offer": BIG_OFFER,
        "mac": None,
        "peers": [],
        "stay": True,
    }
    body = json.dumps({**accept, "transport": "test_greeting"}).encode()
    assert decode(body, (Accept,)).offer == BIG_OFFER
    body = json.dumps({**accept, "transport": "tcp"}).encode()
    with pytest.raises(ProtocolError, match="offer"):
        decode(body, (Accept,))


def test_a_server_offers_only_the_engines_its_options_enable(greeting_engine, monkeypatch):
    monkeypatch.setattr(GreetingEngine, "enabled", lambda self, options: False)
    with in_process_server(all_cases(), IDENT) as server:
        assert greeting_engine.registered == []
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT, transports=["test_greeting"])
    assert info.value.code == "transport"


# --- events ---------------------------------------------------------------------------------


@pytest.fixture
def seen():
    got: list[ev.Event] = []
    lock = threading.Lock()

    def keep(event: ev.Event) -> None:
        with lock:
            got.append(event)

    unsubscribe = ev.subscribe(keep)
    yield got
    unsubscribe()


def of(kind: type, events: list[ev.Event]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_a_pull_is_seen_as_events(seen):
    tensors = all_cases()
    with in_process_server(tensors, IDENT, chunk_size=CHUNK) as server:
        result = pull(server.address, IDENT, streams=2)
        chunks = server.snapshot.plan.num_chunks
        total = server.snapshot.plan.total_bytes
    (accepted,) = of(ev.PullAccepted, seen)
    assert (accepted.model, accepted.transport, accepted.delivers) == ("seam-model", "tcp", True)
    sent = of(ev.ChunkSent, seen)
    assert len(sent) == chunks and sum(e.nbytes for e in sent) == total
    received = of(ev.ChunkReceived, seen)
    assert len(received) == chunks and sum(e.nbytes for e in received) == total
    (done,) = of(ev.TransferDone, seen)
    assert done.ok and (done.model, done.nbytes, done.streams) == ("seam-model", total, 2)
    (pulled,) = of(ev.Pulled, seen)
    assert (pulled.model, pulled.nbytes, pulled.refetched) == ("seam-model", total, 0)
    assert result.total_bytes == total


def test_a_refusal_is_an_event_with_its_code(seen):
    with in_process_server(all_cases(), IDENT) as server, pytest.raises(Refused):
        pull(server.address, Identity("another-model"))
    (refused,) = of(ev.PullRefused, seen)
    assert (refused.model, refused.code) == ("another-model", "model")
    assert "client wants 'another-model'" in refused.reason
    assert not of(ev.PullAccepted, seen)


def test_a_client_waiting_for_a_slot_is_an_event(seen):
    """One slot, held by a client that stalls after its Accept; the second client queues."""
    tensors = all_cases()
    with in_process_server(tensors, IDENT, max_clients=1, handshake_timeout=10) as server:
        holder = RawClient(server.address)
        assert holder.request_pull(IDENT).kind == "accept"  # holds the slot, attaches nothing
        waiter = threading.Thread(target=lambda: pull(server.address, IDENT), daemon=True)
        waiter.start()
        ev_wait(seen, ev.Queued)
        holder.close()
        waiter.join(timeout=30)
    (queued,) = of(ev.Queued, seen)
    assert queued.slots == 1


def ev_wait(seen: list[ev.Event], kind: type, timeout: float = 10.0) -> None:
    wait_for(lambda: of(kind, seen), timeout, f"a {kind.__name__} event")


def test_a_failing_subscriber_does_not_stop_a_pull(seen, caplog):
    def broken(event: ev.Event) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe = ev.subscribe(broken)
    try:
        tensors = all_cases()
        with in_process_server(tensors, IDENT) as server:
            assert_same(tensors, pull(server.address, IDENT).tensors)
    finally:
        unsubscribe()
    assert "subscriber bug" in caplog.text
    assert of(ev.TransferDone, seen)


def test_a_broken_transfer_is_a_failed_transfer_done(seen):
    """A client that leaves after its Accept, without attaching a stream."""
    with in_process_server(all_cases(), IDENT) as server:
        client = RawClient(server.address)
        assert client.request_pull(IDENT).kind == "accept"
        client.close()
        ev_wait(seen, ev.TransferDone)
    (done,) = of(ev.TransferDone, seen)
    assert not done.ok and done.nbytes == 0
