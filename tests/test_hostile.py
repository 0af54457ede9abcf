"""Hostile control traffic against a live server: it refuses or drops, allocates nothing beyond
the frame limit, and keeps serving."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import all_cases, assert_same, frames_of, in_process_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netloader import Identity, info, pull
from netloader.protocol import HEADER, MAGIC, PROTOCOL_VERSION

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


def read_greeting(sock: socket.socket) -> dict:
    data = b""
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack(data[:8])[1]:
        piece = sock.recv(4096)
        assert piece, "server closed before its greeting was complete"
        data += piece
    (hello,) = frames_of(data)
    return hello


def send_raw(address: str, payload: bytes, limit: float = 10.0) -> bytes:
    """Send ``payload`` after the greeting and half-close; everything the server answers until
    it hangs up. A close or a reset ends the answer; a server that neither answers nor hangs up
    within ``limit`` seconds (its handshake limit is 1 s) fails the test."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=limit) as sock:
        assert read_greeting(sock)["kind"] == "hello"
        answer = b""
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while piece := sock.recv(65536):
                answer += piece
        except TimeoutError:
            pytest.fail(f"server hung: no hang-up {limit:g} s after {payload[:80]!r}")
        except OSError:
            pass  # reset, broken pipe, not connected: the server dropped us, fair for garbage
        return answer


def framed(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body)) + body


def pull_json(**changes) -> dict:
    """A valid PullRequest for the served model, as JSON, with ``changes`` applied."""
    request = {
        "kind": "pull",
        "protocol": PROTOCOL_VERSION,
        "identity": {
            "model": "test-model",
            "rank": 0,
            "world_size": 1,
            "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1,
        },
        "manifest": None,
        "transports": ["tcp"],
        "streams": 1,
        "nonce": "ab" * 16,
        "mac": None,
        "advertise": None,
        "discover": False,
        "avoid": [],
    }
    return {**request, **changes}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
# (payload, what the server must answer): "accept" for a valid request, "refuse" for a complete
# frame it must turn down with a reason, "no accept" for bytes it may also just hang up on.
frames = st.one_of(
    st.tuples(st.binary(max_size=512), st.just("no accept")),
    st.tuples(st.binary(max_size=512).map(framed), st.just("refuse")),
    st.tuples(st.just(HEADER.pack(MAGIC, 0xFFFFFFFF)), st.just("refuse")),
    # With bytes behind the refused header, the server hangs up on unread data: the kernel
    # may then reset the connection and drop the refusal before it is read.
    st.tuples(
        st.binary(min_size=1, max_size=64).map(lambda b: HEADER.pack(MAGIC, 0xFFFFFFFF) + b),
        st.just("no accept"),
    ),
    st.tuples(
        json_values.map(
            lambda v: framed(json.dumps({"kind": "pull", "protocol": 1, "identity": v}).encode())
        ),
        st.just("refuse"),
    ),
    # Valid requests, sometimes for several streams, or proposing first transports that cannot
    # serve CPU tensors here (gloo could, but its rendezvous would make each example wait 1 s).
    st.tuples(
        st.builds(
            lambda streams, transports, nonce, mac: pull_json(
                streams=streams, transports=[*transports, "tcp"], nonce=nonce, mac=mac
            ),
            st.integers(1, 64),
            st.lists(st.sampled_from(["nccl", "hccl", "carrier-pigeon"]), max_size=3),
            st.binary(min_size=16, max_size=16).map(bytes.hex),
            st.none() | st.just("ab" * 32),  # a server without a token ignores proofs
        ).map(lambda r: framed(json.dumps(r).encode())),
        st.just("accept"),
    ),
    st.tuples(  # almost valid: one field a valid request must not have
        st.sampled_from(
            [
                {"identity": {**pull_json()["identity"], "model": "other-model"}},
                {"identity": {**pull_json()["identity"], "rank": 1, "world_size": 2}},
                {"identity": {**pull_json()["identity"], "rank": True}},
                {"identity": None},
                {"protocol": PROTOCOL_VERSION + 1},
                {"discover": None},
                {"avoid": ["not-an-address"]},
                {"streams": 0},
                {"streams": 65},
                {"transports": []},
                {"transports": ["carrier-pigeon"]},
                {"nonce": "ab" * 15},
                {"manifest": [["big", "float32", [3, 299_999]]]},
                {"kind": "accept"},
            ]
        ).map(lambda change: framed(json.dumps(pull_json(**change)).encode())),
        st.just("refuse"),
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames)
def test_live_server_survives_any_frame(server, frame):
    payload, expected = frame
    kinds = [f["kind"] for f in frames_of(send_raw(server.address, payload))]
    if expected == "accept":
        assert kinds == ["accept"], kinds  # the weights would follow on a data connection
    elif expected == "refuse":
        assert kinds == ["refuse"], kinds
    else:
        assert kinds in ([], ["refuse"]), kinds
    # And it still answers a normal request at once.
    assert info(server.address, timeout=10).tensors == len(all_cases())


def test_still_serving_after_the_fuzzing(server):
    assert_same(all_cases(), pull(server.address, IDENT).tensors)
