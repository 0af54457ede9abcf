"""Mismatches are refused with a reason on both sides, before any weight byte moves."""

import contextlib
import socket
import threading

import pytest
import torch
from helpers import Proxy, ServerProcess, all_cases, assert_same, frames_of

from netloader import Identity, Refused, pull
from netloader.errors import ProtocolError
from netloader.manifest import Manifest
from netloader.protocol import PROTOCOL_VERSION, Accept, Channel, Hello, PullRequest, StreamAttach
from netloader.snapshot import Snapshot
from netloader.transport.chunks import CHUNK_HEADER, END

SERVED = Identity("served-model", rank=1, world_size=2, tensor_parallel_size=2)
MODEL = "test-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with ServerProcess(identity=SERVED, log_path=log) as srv:
        yield srv


def sentinel(t):
    return 1 if t.dtype == torch.bool else 0xAB  # bool memory must hold 0 or 1


def filled(shape, dtype=torch.float32):
    t = torch.empty(shape, dtype=dtype)
    t.reshape(-1).view(torch.uint8).fill_(sentinel(t))
    return t


def sentinel_dest():
    """Contiguous destinations filled with a sentinel byte, to prove nothing was written."""
    return {n: filled(t.shape, t.dtype) for n, t in all_cases().items()}


def untouched(dest):
    return all(bool((t.reshape(-1).view(torch.uint8) == sentinel(t)).all()) for t in dest.values())


def expect_refusal(server, identity, dest, code, *fragments):
    """Pull through a relay that records what the server sends: the server itself refused,
    and sent nothing but its greeting and the refusal (no weight byte, no data connection)."""
    sent = bytearray()

    def record(conn, offset, data):
        sent.extend(data)
        return data

    proxy = Proxy(server.address, record, per_connection=True)
    try:
        with pytest.raises(Refused) as info:
            pull(proxy.address, identity, into=dest)
    finally:
        proxy.close()
    err = info.value
    assert err.code == code
    assert not err.partial
    frames = frames_of(bytes(sent))
    assert [f["kind"] for f in frames] == ["hello", "refuse"], frames
    assert frames[1]["code"] == code
    assert proxy.connections == 1 and proxy.relayed == len(sent)
    for fragment in fragments:
        assert fragment in str(err)
        assert fragment in frames[1]["reason"]  # the server's reason, not the client's
        assert fragment in server.log()  # and the server logged it
    assert untouched(dest)  # not a single byte landed in the destination
    return err


def test_wrong_model(server):
    ident = Identity("other-model", rank=1, world_size=2, tensor_parallel_size=2)
    expect_refusal(server, ident, sentinel_dest(), "model", "'served-model'", "'other-model'")


def test_wrong_layout(server):
    ident = Identity(
        "served-model", rank=1, world_size=2, tensor_parallel_size=1, pipeline_parallel_size=2
    )
    expect_refusal(server, ident, sentinel_dest(), "layout", "tp=2 pp=1", "tp=1 pp=2")


def test_wrong_world_size(server):
    ident = Identity("served-model", rank=1, world_size=4, tensor_parallel_size=4)
    expect_refusal(server, ident, sentinel_dest(), "layout", "world_size=4")


def test_wrong_rank(server):
    ident = Identity("served-model", rank=0, world_size=2, tensor_parallel_size=2)
    expect_refusal(server, ident, sentinel_dest(), "rank", "rank 1", "rank 0")


def test_manifest_name(server):
    dest = sentinel_dest()
    dest["renamed"] = dest.pop("big")
    expect_refusal(server, SERVED, dest, "manifest", "'renamed'", "'big'")


def test_manifest_shape(server):
    dest = sentinel_dest()
    dest["big"] = filled((3, 299_999))
    expect_refusal(
        server,
        SERVED,
        dest,
        "manifest",
        "'big' server float32[3, 300000] vs client float32[3, 299999]",
    )


def test_manifest_dtype(server):
    dest = sentinel_dest()
    dest["int8.matrix"] = filled((37, 19), torch.uint8)
    expect_refusal(
        server,
        SERVED,
        dest,
        "manifest",
        "'int8.matrix' server int8[37, 19] vs client uint8[37, 19]",
    )


def test_manifest_extra_tensor(server):
    dest = sentinel_dest()
    dest["extra.bias"] = filled((4,))
    expect_refusal(server, SERVED, dest, "manifest", "1 tensor(s) only at client: 'extra.bias'")


def test_manifest_missing_tensor(server):
    dest = sentinel_dest()
    del dest["float16.scalar"]
    expect_refusal(server, SERVED, dest, "manifest", "1 tensor(s) only at server: 'float16.scalar'")


def test_matching_request_still_served(server):
    """The refusals above left the server healthy."""
    dest = sentinel_dest()
    pull(server.address, SERVED, into=dest)
    assert_same(all_cases(), dest)


class LyingServer:
    """Answers every PullRequest with an Accept whose ``changes`` (identity, manifest,
    transport) do not match what was asked, and then answers the chunk requests of whatever
    data connection comes: a client that believed the Accept would receive weight bytes."""

    def __init__(self, tensors, **changes):
        self.snapshot = Snapshot(tensors, chunk_size=64 << 10)
        self.changes = changes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.data_connections = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        with sock, contextlib.suppress(OSError, ProtocolError):
            channel = Channel(sock, 10)
            channel.send(Hello(PROTOCOL_VERSION, "00" * 16, False))
            request = channel.recv_any(PullRequest, StreamAttach)
            s = self.snapshot
            if isinstance(request, PullRequest):
                fields = dict(identity=request.identity, manifest=s.manifest, transport="tcp")
                fields.update(self.changes)
                channel.send(
                    Accept(
                        "11" * 16,
                        aliases=s.aliases,
                        streams=1,
                        chunk_size=s.plan.chunk_size,
                        digests=s.digests,
                        **fields,
                    )
                )
                sock.recv(1)  # until the client hangs up
                return
            self.data_connections += 1
            while (index := CHUNK_HEADER.unpack(channel.recv_exact(CHUNK_HEADER.size))[0]) != END:
                pieces = [s.buffers[p][a:b].numpy().tobytes() for p, a, b in s.plan.pieces(index)]
                sock.sendall(CHUNK_HEADER.pack(index) + b"".join(pieces))  # the chunk asked for

    def close(self) -> None:
        self.listener.close()


def reshaped_big(seed: int = 0):
    tensors = all_cases(seed)
    tensors["big"] = tensors["big"].reshape(900_000)
    return tensors


@pytest.mark.parametrize(
    "changes, code, fragment",
    [
        ({"identity": Identity("other-model")}, "model", "'other-model'"),
        ({"identity": Identity(MODEL, 0, 2, 2)}, "layout", "world_size=2 tp=2"),
        ({"identity": Identity(MODEL, 1, 2)}, "rank", "rank 1"),
        ({"manifest": Manifest.of(reshaped_big())}, "manifest", "float32[900000]"),
        (
            {"manifest": Manifest.of({**all_cases(), "extra.bias": torch.zeros(4)})},
            "manifest",
            "only at server: 'extra.bias'",
        ),
        ({"transport": "gloo"}, "transport", "'gloo'"),
    ],
)
def test_client_refuses_an_accept_that_does_not_match_its_request(changes, code, fragment):
    """The client checks the Accept itself before any byte may land: a server that answers
    for another model, layout, rank or manifest, or on a transport not offered, is refused."""
    liar = LyingServer(all_cases(), **changes)
    try:
        dest = sentinel_dest()
        ident = Identity(MODEL, 0, 2) if code == "rank" else Identity(MODEL)
        with pytest.raises(Refused) as info:
            pull(liar.address, ident, into=dest, transports=["tcp"])
        assert info.value.code == code
        assert "server accepted a request it does not match" in str(info.value)
        assert fragment in str(info.value)
        assert not info.value.partial
        assert liar.data_connections == 0
        assert untouched(dest)
    finally:
        liar.close()


def test_the_lying_server_delivers_to_a_client_that_believes_it():
    """Without a lie, the fake above is a working source: the refusals are the client's doing."""
    liar = LyingServer(all_cases())
    try:
        assert_same(all_cases(), pull(liar.address, Identity(MODEL), transports=["tcp"]).tensors)
        assert liar.data_connections == 1
    finally:
        liar.close()
