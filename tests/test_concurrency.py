"""Several clients at once: all bit-exact; beyond the limits they wait, or are refused as busy."""

import contextlib
import logging
import multiprocessing as mp
import threading
import time

import pytest
from helpers import (
    RawClient,
    ServerProcess,
    all_cases,
    assert_same,
    in_process_server,
    wait_for,
)

from netloader import Identity, Refused, pull
from netloader.protocol import Accept

IDENT = Identity("test-model")


def _pull_and_check(address: str, queue) -> None:
    try:
        result = pull(address, IDENT, handshake_timeout=120)
        assert_same(all_cases(), result.tensors)
        queue.put("ok")
    except BaseException as exc:  # report, do not hang the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_eight_clients_at_once_all_bit_exact():
    """8 client processes start together against a server that runs 2 transfers at a time:
    the rest queue for a slot, and every one of them gets every byte right."""
    ctx = mp.get_context("spawn")
    with ServerProcess(max_clients=2, chunk_size=64 << 10) as srv:
        queue = ctx.Queue()
        clients = [ctx.Process(target=_pull_and_check, args=(srv.address, queue)) for _ in range(8)]
        for c in clients:
            c.start()
        results = [queue.get(timeout=300) for _ in clients]
        for c in clients:
            c.join(30)
    assert results == ["ok"] * 8


@contextlib.contextmanager
def slot_held(**limits):
    """A one-slot server, and a client that got its Accept and sits there holding the slot."""
    server = in_process_server(all_cases(), max_clients=1, **limits)
    try:
        holder = RawClient(server.address)
        assert isinstance(holder.request_pull(IDENT), Accept)
        yield server, holder
    finally:
        server.close()


def test_busy_is_refused_with_a_reason_when_nobody_may_wait():
    with slot_held(max_waiting=0, idle_timeout=30) as (server, holder):
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT)
        assert info.value.code == "busy"
        assert "all 1 transfer slots and the waiting queue are full" in str(info.value)
        holder.close()  # the server notices the client left and frees the slot within a second,
        deadline = time.monotonic() + 10  # not after the 30 s idle limit
        while True:
            try:
                result = pull(server.address, IDENT)
                break
            except Refused:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert_same(all_cases(), result.tensors)


def test_a_waiting_client_gets_the_slot_when_it_frees(caplog):
    caplog.set_level(logging.INFO, "netloader.server")
    with slot_held(max_waiting=4, handshake_timeout=20) as (server, holder):
        done = {}
        waiter = threading.Thread(target=lambda: done.update(r=pull(server.address, IDENT)))
        waiter.start()
        wait_for(lambda: "a client waits for a transfer slot" in caplog.text, 15, "queueing")
        assert not done  # queued, not refused: the slot is still held
        holder.close()
        waiter.join(30)
        assert_same(all_cases(), done["r"].tensors)


def test_queue_wait_is_bounded_by_the_handshake_limit():
    with slot_held(max_waiting=4, handshake_timeout=1.5) as (server, holder):
        start = time.monotonic()
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT)
        assert info.value.code == "busy"
        assert "stayed in use for 1.5 s" in str(info.value)
        assert time.monotonic() - start < 10
        holder.close()
