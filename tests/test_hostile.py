"""Hostile control traffic against a live server: it refuses or drops, allocates nothing beyond
the frame limit, and keeps serving."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import all_cases, assert_same, in_process_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netloader import Identity, pull
from netloader.protocol import HEADER, MAGIC

ROOT = Path(__file__).parent.parent
IDENT = Identity("test-model")


def test_stress_script_small():
    """The 10,000-connection stress script, at CI size: every kind of hostile connection, then
    a bit-exact pull with threads, fds and memory back where they were."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress_hostile.py"), "--connections", "600"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "normal pull bit-exact: yes" in proc.stdout
    assert proc.stdout.strip().endswith("OK")


@pytest.fixture(scope="module")
def server():
    srv = in_process_server(all_cases(), handshake_timeout=1.0, idle_timeout=1.0)
    yield srv
    srv.close()


def send_raw(address: str, payload: bytes) -> bytes:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.recv(65536)  # the greeting
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(65536)
        except OSError:
            return b""


def framed(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body)) + body


frames = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=512).map(lambda b: HEADER.pack(MAGIC, len(b)) + b),
    st.binary(max_size=64).map(lambda b: HEADER.pack(MAGIC, 0xFFFFFFFF) + b),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=12,
    ).map(lambda v: framed(json.dumps({"kind": "pull", "protocol": 1, "identity": v}).encode())),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames)
def test_live_server_survives_any_frame(server, payload):
    answer = send_raw(server.address, payload)
    # Either silence/close or a refusal frame; never weights.
    assert not answer or answer.startswith(MAGIC)
    assert b'"accept"' not in answer


def test_still_serving_after_the_fuzzing(server):
    assert_same(all_cases(), pull(server.address, IDENT).tensors)
