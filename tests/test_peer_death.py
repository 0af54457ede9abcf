"""Peers that die mid-way: the server frees everything and keeps serving; the client fails fast
with a clear error and marks its tensors invalid."""

import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time

import pytest
from helpers import (
    Proxy,
    ServerProcess,
    assert_same,
    big_cases,
    in_process_server,
    kill_after,
    netloader_threads,
    wait_for,
)

from netloader import Identity, PeerClosed, pull

IDENT = Identity("test-model")


def _client_pool(conn, address: str) -> None:
    """Imports netloader once, then forks one pulling child per request (fork is cheap and
    safe here: this process runs no other threads). Reports the child's pid, then, on
    "wait", the moment the child's first chunk of weights landed."""
    import netloader  # noqa: F401 - warm the imports the children inherit

    while conn.recv() == "go":
        landed_r, landed_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _pull_and_stall(address, landed_w)
            finally:
                os._exit(0)
        os.close(landed_w)
        conn.send(pid)
        if conn.recv() == "wait":
            conn.send(os.read(landed_r, 1) == b"a")
        os.close(landed_r)
        while True:  # reap finished children
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _pull_and_stall(address: str, landed_w: int) -> None:
    """Pull; once a chunk has landed, say so and stop reading. With receive buffers capped at
    64 KiB the server cannot push the rest of its 64 MiB into the sockets: it is mid-transfer
    until this process is killed (or its 2 s idle limit drops it)."""
    connect = socket.create_connection

    def small_window(*args, **kwargs):
        sock = connect(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        return sock

    socket.create_connection = small_window

    def landed(nbytes: int) -> None:
        os.write(landed_w, b"a")
        threading.Event().wait(60)  # killed long before

    pull(address, IDENT, streams=2, progress=landed)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_twenty_clients_killed_mid_transfer_leak_nothing(caplog):
    caplog.set_level(logging.WARNING, "netloader.server")
    before = netloader_threads()
    server = in_process_server(big_cases(), max_clients=1, idle_timeout=2.0, handshake_timeout=10)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pool = ctx.Process(target=_client_pool, args=(child, server.address), daemon=True)
    pool.start()

    def settled() -> bool:  # the server is back to its listener alone
        return [t.name for t in netloader_threads(before)] == ["netloader-accept"]

    try:
        pull(server.address, IDENT)  # warm up, then take the baseline
        wait_for(settled, 20, "the warm-up transfer's end")
        fds = open_fds()
        rng = random.Random(0)
        for i in range(20):
            parent.send("go")
            pid = parent.recv()
            if i % 2:  # while weights move: the child stalls after its first chunk
                parent.send("wait")
                assert parent.recv(), "no chunk landed"
            else:  # anywhere from connecting to the handshake
                parent.send("now")
                time.sleep(rng.uniform(0.0, 0.02))
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: settled() and open_fds() <= fds and not len(server.dispatcher.sessions),
            30,
            "clean-up",
        )
        # The server noticed and logged every client killed while its weights were moving.
        assert caplog.text.count("transfer to ") >= 10, caplog.text
        # The only transfer slot is free again and the next pull is bit-exact.
        assert_same(big_cases(), pull(server.address, IDENT, handshake_timeout=10).tensors)
    finally:
        parent.send("stop")
        pool.join(10)
        server.close()


def test_server_killed_mid_transfer():
    with ServerProcess(builder="helpers:big_cases") as srv:
        proxy = Proxy(srv.address, kill_after(1 << 20, srv.kill))
        start = time.monotonic()
        try:
            with pytest.raises(PeerClosed) as info:
                pull(proxy.address, IDENT, idle_timeout=30)
        finally:
            proxy.close()
        assert time.monotonic() - start < 10  # a closed connection is noticed at once
        assert info.value.partial  # some bytes landed: those tensors must not be used
        assert "lost" in str(info.value) or "closed" in str(info.value)
