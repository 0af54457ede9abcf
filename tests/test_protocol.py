"""Control messages: round trips (property-based), and hostile bytes only ever raise ProtocolError."""

import contextlib
import json
import os
import socket
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader.errors import ProtocolError
from netloader.identity import Identity
from netloader.manifest import DTYPES, Manifest, TensorSpec
from netloader.protocol import (
    HEADER,
    MAGIC,
    MESSAGES,
    Accept,
    Channel,
    Done,
    Hello,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    StreamAttach,
    decode,
    encode,
)

hexes = lambda n: st.binary(min_size=n, max_size=n).map(bytes.hex)  # noqa: E731
names = st.text(min_size=1, max_size=40)
identities = st.builds(
    lambda model, ws, tp, pp, rank: Identity(
        model, rank % ws, ws, min(tp, ws), max(1, min(pp, ws // min(tp, ws)))
    ),
    names,
    st.integers(1, 64),
    st.integers(1, 64),
    st.integers(1, 8),
    st.integers(0, 63),
)
specs = st.builds(
    TensorSpec,
    names,
    st.sampled_from(list(DTYPES.values())),
    st.lists(st.integers(0, 1 << 10), max_size=4).map(tuple),
)
manifests = st.lists(specs, max_size=20, unique_by=lambda s: s.name).map(Manifest)
texts = st.text(max_size=200)


@st.composite
def accepts(draw):
    manifest = draw(manifests)
    n = len(manifest)
    aliases = {}
    if n >= 2:
        specs = list(manifest.specs)
        for i in draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)):
            j = draw(st.integers(0, i - 1))
            if (
                j not in aliases and i not in aliases.values()
            ):  # an alias is the same dtype and shape as a tensor that is not one
                aliases[i] = j
                specs[i] = TensorSpec(specs[i].name, specs[j].dtype, specs[j].shape)
        manifest = Manifest(specs)
    return Accept(
        session=draw(hexes(16)),
        identity=draw(identities),
        manifest=manifest,
        aliases=aliases,
        transport=draw(st.sampled_from(["tcp", "gloo", "nccl"])),
        streams=draw(st.integers(1, 64)),
        chunk_size=draw(st.integers(64 << 10, 256 << 20)),
        digests=draw(st.none() | st.lists(st.integers(0, (1 << 64) - 1), max_size=10)),
        offer=draw(st.dictionaries(st.text(max_size=10), st.integers(), max_size=3)),
        mac=draw(st.none() | hexes(32)),
    )


messages = st.one_of(
    st.builds(Hello, st.integers(0, 100), hexes(16), st.booleans()),
    st.builds(
        PullRequest,
        st.integers(0, 100),
        identities,
        st.none() | manifests,
        st.lists(st.sampled_from(["tcp", "gloo", "nccl"]), min_size=1, max_size=3),
        st.integers(1, 64),
        hexes(16),
        st.none() | hexes(32),
    ),
    st.builds(InfoRequest, st.integers(0, 100), hexes(16), st.none() | hexes(32)),
    st.builds(StreamAttach, hexes(16), st.integers(0, 63)),
    accepts(),
    st.builds(Refuse, st.text(max_size=64), texts),
    st.builds(
        InfoReply,
        st.integers(0, 100),
        identities,
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 62),
        st.none() | hexes(32),
    ),
    st.builds(Done, st.booleans(), texts),
)


def roundtrip(msg):
    frame = encode(msg)
    magic, length = HEADER.unpack(frame[: HEADER.size])
    assert magic == MAGIC and length == len(frame) - HEADER.size
    return decode(frame[HEADER.size :], (type(msg),))


@settings(max_examples=300, deadline=None)
@given(messages)
def test_roundtrip(msg):
    assert roundtrip(msg) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_protocol_error_only(body):
    with pytest.raises(ProtocolError):
        decode(body, tuple(MESSAGES.values()))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(sorted(MESSAGES)),
    st.dictionaries(st.text(max_size=12), json_values, max_size=8),
)
def test_wrong_json_types_raise_protocol_error_only(kind, fields):
    """Any JSON object with a valid kind either decodes to a valid message or is refused cleanly."""
    body = json.dumps({**fields, "kind": kind}).encode()
    with contextlib.suppress(ProtocolError):
        decode(body, tuple(MESSAGES.values()))


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_mutated_field_types_are_refused(msg, data):
    obj = msg.to_json()
    key = data.draw(st.sampled_from(sorted(k for k in obj if k != "kind")))
    obj[key] = data.draw(st.sampled_from([[], {}, "x" * 5000, -1, 1.5, True, None, 1 << 70]))
    with contextlib.suppress(ProtocolError):
        decode(json.dumps(obj).encode(), (type(msg),))


def test_unknown_kind_and_unexpected_kind():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(b'{"kind": "shutdown"}', tuple(MESSAGES.values()))
    with pytest.raises(ProtocolError, match="unexpected 'done' message"):
        decode(encode(Done(True))[HEADER.size :], (Hello,))


def test_manifest_rejects_unknown_dtype_and_bad_shapes():
    for bad in (
        [["w", "float128", [1]]],
        [["w", "float32", [-1]]],
        [["w", "float32", [1.5]]],
        [["w", "float32", [True]]],
        [["w", "float32", [1] * 33]],
        [["w", "float32", [1 << 40, 1 << 40]]],
        [["w", "float32", [1]], ["w", "float32", [1]]],
        [["", "float32", [1]]],
        {"w": 1},
    ):
        with pytest.raises(ProtocolError):
            Manifest.from_json(bad)


def test_accept_refuses_aliases_a_client_could_not_honour():
    manifest = Manifest(
        [
            TensorSpec("a", torch.float32, (2, 3)),
            TensorSpec("b", torch.float32, (2, 3)),
            TensorSpec("c", torch.float32, (3, 2)),
            TensorSpec("d", torch.float32, (2, 3)),
        ]
    )
    good = Accept(
        "00" * 16, Identity("m", 0, 1, 1, 1), manifest, {1: 0, 3: 0}, "tcp", 1, 1 << 20, None
    )
    assert roundtrip(good) == good
    for aliases, reason in (
        ({2: 0}, "different dtype or shape"),  # a copy into a tensor of another shape
        ({1: 0, 3: 1}, "itself an alias"),  # a chain, filled in an order the client cannot know
    ):
        bad = Accept("00" * 16, good.identity, manifest, aliases, "tcp", 1, 1 << 20, None)
        with pytest.raises(ProtocolError, match=reason):
            roundtrip(bad)


def test_manifest_of_tensors():
    m = Manifest.of({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.tensor(1)})
    assert m.to_json() == [["a", "bfloat16", [2, 3]], ["b", "int64", []]]
    assert m.total_bytes == 12 + 8


def pair():
    a, b = socket.socketpair()
    return Channel(a, idle=2.0), b


def test_huge_length_prefix_is_refused_before_reading():
    channel, peer = pair()
    peer.sendall(HEADER.pack(MAGIC, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        channel.recv(Done)


def test_frame_limit_depends_on_expected_kind():
    channel, peer = pair()
    body = json.dumps({"kind": "done", "ok": True, "reason": "x" * 70_000}).encode()
    peer.sendall(HEADER.pack(MAGIC, len(body)) + body)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        channel.recv(Done)


def test_bad_magic():
    channel, peer = pair()
    peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="bad frame magic"):
        channel.recv(Done)


def test_truncated_frame_is_a_connection_error():
    channel, peer = pair()
    frame = encode(Done(True))
    peer.sendall(frame[:-3])
    peer.close()
    with pytest.raises(ConnectionError):
        channel.recv(Done)


def test_slow_sender_hits_the_deadline():
    import time

    channel, peer = pair()
    frame = encode(Done(True))

    def trickle():
        for byte in frame:
            time.sleep(0.05)
            try:
                peer.send(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    with pytest.raises(TimeoutError):
        channel.recv(Done, deadline=time.monotonic() + 0.3)
    peer.close()


def test_body_grows_only_as_bytes_arrive():
    """A length prefix of 64 MiB with 10 bytes behind it allocates about 10 bytes, not 64 MiB."""
    channel, peer = pair()
    peer.sendall(HEADER.pack(MAGIC, 60 << 20) + os.urandom(10))
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        channel.recv(PullRequest)
