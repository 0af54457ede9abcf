"""Peers that die mid-way: the server frees everything and keeps serving; the client fails fast
with a clear error and marks its tensors invalid."""

import logging
import multiprocessing as mp
import os
import random
import signal
import threading
import time

import pytest
from helpers import Proxy, ServerProcess, assert_same, big_cases, in_process_server, kill_after

from netloader import Identity, PeerClosed, pull

IDENT = Identity("test-model")


def _client_pool(conn, address: str) -> None:
    """Imports netloader once, then forks one pulling child per request (fork is cheap and
    safe here: this process runs no other threads). Reports the child's pid, then, on
    "wait", the moment the child's pull was accepted (weights are about to move)."""
    import netloader  # noqa: F401 - warm the imports the children inherit

    while conn.recv() == "go":
        accepted_r, accepted_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                pull(address, IDENT, streams=2, on_accept=lambda _, w=accepted_w: os.write(w, b"a"))
            finally:
                os._exit(0)
        os.close(accepted_w)
        conn.send(pid)
        if conn.recv() == "wait":
            conn.send(os.read(accepted_r, 1) == b"a")
        os.close(accepted_r)
        while True:  # reap finished children
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_twenty_clients_killed_mid_transfer_leak_nothing(caplog):
    caplog.set_level(logging.WARNING, "netloader.server")
    server = in_process_server(big_cases(), max_clients=1, idle_timeout=2.0, handshake_timeout=2.0)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pool = ctx.Process(target=_client_pool, args=(child, server.address), daemon=True)
    pool.start()
    try:
        pull(server.address, IDENT)  # warm up, then take the baseline
        time.sleep(0.5)
        threads, fds = threading.active_count(), open_fds()
        rng = random.Random(0)
        for i in range(20):
            parent.send("go")
            pid = parent.recv()
            if i % 2:  # while weights move: 64 MiB take some tens of milliseconds here
                parent.send("wait")
                assert parent.recv(), "the pull was not accepted"
                time.sleep(rng.uniform(0.0, 0.01))
            else:  # anywhere from connecting to the handshake
                parent.send("now")
                time.sleep(rng.uniform(0.0, 0.02))
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if threading.active_count() <= threads and open_fds() <= fds and not server._sessions:
                break
            time.sleep(0.2)
        assert threading.active_count() <= threads
        assert open_fds() <= fds
        assert not server._sessions
        # The server noticed and logged the clients killed while their weights were moving.
        assert caplog.text.count("transfer to ") >= 8, caplog.text
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
